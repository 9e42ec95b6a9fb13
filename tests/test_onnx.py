"""ONNX export in both modes, run in ONNX Runtime and checked against PEFT's unmerged model.

Exports take 5 to 15 s each, so every graph is exported once per module (`exports`), on first use, and shared.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fixtures.build import ADAPTERS, randomize_trainables
from tests.helpers import adapter_dir, base_dir, load_base, load_peft
from vera_export import (
    AdapterError,
    CheckpointError,
    IncompatibleAdapterError,
    OnnxAdapterOptions,
    OnnxOptions,
    OutputError,
    load_adapter,
)
from vera_export.io.index import ShardedTensorIndex
from vera_export.onnx.adapter_file import onnx_adapter
from vera_export.onnx.export import OnnxReport, export_onnx, resolve_task
from vera_export.onnx.manifest import MANIFEST_NAME, Manifest
from vera_export.onnx.modes import MODES
from vera_export.onnx.runtime import session
from vera_export.onnx.signature import VERA_A, VERA_B, lambda_input, tensor_input
from vera_export.onnx.verify import verify_onnx
from vera_export.projections import Rounding, generate_projections

# Float32 graph against PEFT's float32 model: the two round differently, by a few float32 roundoffs of outputs of
# magnitude about 1 (3e-7 at most here). The adapters move the outputs by more than 1e-2 (checked below).
ATOL, RTOL = 2e-6, 1e-5
# Neither shape is the export's example (2 x 8); one has batch 1, the first row of the other is left-padded.
SHAPES = [(1, 5), (3, 12)]


@dataclass(frozen=True)
class ExportSpec:
    fixture: str
    adapters: tuple[str, ...]
    mode: str
    task: str = "auto"
    external_data: bool | None = None
    opset: int = 18


SPECS = {
    "llama-adapter": ExportSpec("llama-qv", ("llama-qv",), "adapter"),
    "llama-merged": ExportSpec("llama-qv", ("llama-qv", "llama-qkv-b"), "merged", opset=23),
    "gpt2-adapter": ExportSpec("gpt2-attn", ("gpt2-attn",), "adapter", external_data=True),
    "gpt2-merged": ExportSpec("gpt2-attn", ("gpt2-attn",), "merged"),
    "bert-adapter": ExportSpec("bert-cls", ("bert-cls",), "adapter"),
    "bert-merged": ExportSpec("bert-cls", ("bert-cls",), "merged"),
    "bert-features": ExportSpec("bert-cls", ("bert-cls",), "adapter", task="feature-extraction"),
    # A trained copy of the embedding that the base ties to lm_head: the head must keep the original.
    "llama-tied-adapter": ExportSpec("llama-tied-embed", ("llama-tied-embed",), "adapter"),
}
ADAPTER_EXPORTS = [key for key, spec in SPECS.items() if spec.mode == "adapter"]


@dataclass
class Export:
    spec: ExportSpec
    base: Path
    adapters: list[Path]
    directory: Path
    report: OnnxReport


class Exports:
    """Exports on first use, so running one test exports only the graph it needs."""

    def __init__(self, root: Path, out: Path) -> None:
        self.root, self.out, self.done = root, out, {}

    def __getitem__(self, key: str) -> Export:
        if key not in self.done:
            spec = SPECS[key]
            base = base_dir(self.root, spec.fixture)
            adapters = [adapter_dir(self.root, a) for a in spec.adapters]
            options = OnnxOptions(
                mode=spec.mode, task=spec.task, external_data=spec.external_data, opset=spec.opset
            )
            report = export_onnx(base, adapters, self.out / key, options)
            self.done[key] = Export(spec, base, adapters, self.out / key, report)
        return self.done[key]


@pytest.fixture(scope="module")
def exports(fixture_root, tmp_path_factory) -> Exports:
    return Exports(fixture_root, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def siblings(fixture_root, tmp_path_factory):
    """Other adapters of a fixture's config, made with PEFT like the fixtures, with other random lambdas."""
    out, built = tmp_path_factory.mktemp("siblings"), {}

    def build(fixture: str, seed: int = 100, **changes) -> Path:
        key = repr((fixture, seed, sorted(changes.items())))
        if key not in built:
            from peft import VeraConfig, get_peft_model

            spec = ADAPTERS[fixture]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = VeraConfig(**{**spec.config, **changes}, task_type=spec.task_type)
                model = get_peft_model(load_base(base_dir(fixture_root, fixture)), config)
            randomize_trainables(model, seed)
            built[key] = out / f"{fixture}-{len(built)}"
            model.save_pretrained(built[key])
        return built[key]

    return build


def _batches(vocab_size: int) -> list[dict[str, np.ndarray]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for batch, length in SHAPES:
        input_ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, : length // 3] = 0
        batches.append({"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    return batches


@torch.no_grad()
def _peft_outputs(export: Export, adapters: list[Path] | None, batches) -> list[np.ndarray]:
    """PEFT's unmerged model (or the bare base, with `adapters=[]`) on `batches`: what the graph must compute."""
    adapters = export.adapters if adapters is None else adapters
    model = load_peft(export.base, adapters).base_model.model if adapters else load_base(export.base)
    if export.spec.task == "feature-extraction":
        model, key = model.base_model, "last_hidden_state"
    else:
        key = "logits"
    return [getattr(model(**{k: torch.from_numpy(v) for k, v in b.items()}), key).numpy() for b in batches]


def _assert_matches(got: list[np.ndarray], want: list[np.ndarray], batches, atol: float = ATOL) -> None:
    """Equal within tolerance at every position the attention mask keeps (padded ones mean nothing)."""
    for g, w, batch in zip(got, want, batches):
        keep = batch["attention_mask"].astype(bool)
        g, w = (g[keep], w[keep]) if g.ndim == 3 else (g, w)
        torch.testing.assert_close(torch.from_numpy(g), torch.from_numpy(w), atol=atol, rtol=RTOL)


def _run(export: Export, batches, run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
    runner = session(export.directory)
    return [runner.run(None, batch, run_options)[0] for batch in batches]


def _vocab_size(export: Export) -> int:
    return load_base(export.base).config.vocab_size


@pytest.mark.parametrize("key", SPECS)
def test_graph_matches_peft(exports, key: str) -> None:
    export = exports[key]
    batches = _batches(_vocab_size(export))
    got = _run(export, batches)
    _assert_matches(got, _peft_outputs(export, None, batches), batches)
    # The check can fail: the base model alone is more than a thousand tolerances away.
    base_only = _peft_outputs(export, [], batches)
    assert max(np.abs(g - b).max() for g, b in zip(got, base_only)) > 1e-2


@pytest.mark.parametrize("key", SPECS)
def test_export_verified_itself(exports, key: str) -> None:
    verification = exports[key].report.verification
    assert verification is not None and verification.passed, [c.line() for c in verification.checks]
    outputs = [c for c in verification.checks if c.name.startswith("onnx ")]
    assert len(outputs) == 2 and all(c.max_abs_error <= c.tolerance < 1e-5 for c in outputs)


@pytest.mark.parametrize("key", SPECS)
def test_graph_interface(exports, key: str) -> None:
    export = exports[key]
    path = export.directory / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert [(o.domain, o.version) for o in model.opset_import if o.domain == ""] == [("", export.spec.opset)]
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    assert [i.name for i in inputs] == ["input_ids", "attention_mask"]
    for value in inputs:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"]
    output = "last_hidden_state" if export.spec.task == "feature-extraction" else "logits"
    assert [o.name for o in graph.output] == [output]
    files = {p.name for p in export.directory.iterdir()}
    assert {"model.onnx", MANIFEST_NAME, "config.json"} <= files
    assert ("model.onnx.data" in files) == bool(export.spec.external_data)
    assert not any(name.endswith(".safetensors") for name in files)


@pytest.mark.parametrize("key", ADAPTER_EXPORTS)
def test_adapter_graph_layout(exports, key: str) -> None:
    """Projections once, no folded copies of them; every trained tensor an overridable input named after it."""
    export = exports[key]
    model = onnx.load(str(export.directory / "model.onnx"))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    vera_A, vera_B = values.pop(VERA_A), values.pop(VERA_B)
    slices = [f(vera_A[:, :k]) for k in range(1, vera_A.shape[1] + 1) for f in (np.asarray, np.transpose)]
    slices += [f(vera_B[:k]) for k in range(1, vera_B.shape[0] + 1) for f in (np.asarray, np.transpose)]
    for name, value in values.items():
        assert not any(value.shape == s.shape and np.array_equal(value, s) for s in slices), name

    adapter = Manifest.read(export.directory)
    expected = {lambda_input(m, kind) for m in adapter.layers for kind in "bd"}
    expected |= {tensor_input(n) for n in adapter.replaced}
    runner = session(export.directory)
    overridable = {i.name for i in runner.get_overridable_initializers()}
    if export.spec.task == "feature-extraction":
        # The classifier and the pooler are not part of the encoder's output: nothing to swap there.
        dropped = {n for n in expected if ".classifier." in f".{n}" or ".pooler." in n}
        assert dropped and overridable == expected - dropped
    else:
        assert overridable == expected
    assert [i.name for i in runner.get_inputs()] == ["input_ids", "attention_mask"]
    assert set(adapter.overridable) == overridable


@pytest.mark.parametrize("key", ADAPTER_EXPORTS)
def test_swapped_adapter_matches_peft(exports, siblings, tmp_path, key: str) -> None:
    export = exports[key]
    other = siblings(export.spec.fixture)
    report = onnx_adapter(export.directory, other, tmp_path / "other.onnx_adapter")
    assert report.bytes_written < 100_000
    batches = _batches(_vocab_size(export))
    lora = ort.LoraAdapter()
    lora.Load(str(report.output))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(lora)
    swapped = _run(export, batches, run_options)
    _assert_matches(swapped, _peft_outputs(export, [other], batches), batches)
    # The swap changed the outputs, and a run without the adapter is the exported adapter again.
    defaults = _peft_outputs(export, None, batches)
    assert max(np.abs(s - d).max() for s, d in zip(swapped, defaults)) > 1e-2
    _assert_matches(_run(export, batches), defaults, batches)


def test_adapter_file_holds_only_trained_tensors(exports, siblings, tmp_path) -> None:
    export = exports["bert-adapter"]
    report = onnx_adapter(export.directory, siblings("bert-cls"), tmp_path / "a.onnx_adapter")
    parameters = ort.AdapterFormat.read_adapter(str(report.output)).get_parameters()
    manifest = Manifest.read(export.directory)
    assert set(parameters) == set(manifest.overridable)
    assert {tensor_input("classifier.weight"), tensor_input("classifier.bias")} <= set(parameters)
    assert report.parameters == sum(int(np.prod(s["shape"])) for s in manifest.overridable.values())


@pytest.mark.parametrize(
    ("fixture", "changes", "fragments"),
    [
        pytest.param(
            "llama-qkv-b",
            None,
            ["adapted layers of the adapter that the graph does not have", "model.layers.0.self_attn.k_proj"],
            id="more layers",
        ),
        pytest.param("llama-all-noproj", None, ["r is 16, the graph's is 8"], id="other r"),
        pytest.param(
            "llama-qv",
            {"projection_prng_key": 7, "save_projection": False},
            ["regenerated from projection_prng_key 7", "differ from the graph's"],
            id="other key",
        ),
        pytest.param(
            "llama-qv",
            {"target_modules": ["q_proj"]},
            ["adapted layers of the graph missing from the adapter", "v_proj"],
            id="fewer layers",
        ),
        pytest.param("gpt2-attn", None, ["has no 2-D weight in the base"], id="other base"),
    ],
)
def test_adapter_file_refuses_a_mismatched_adapter(
    exports, siblings, tmp_path, fixture, changes, fragments
) -> None:
    export = exports["llama-adapter"]
    adapter = adapter_dir(exports.root, fixture) if changes is None else siblings(fixture, **changes)
    with pytest.raises(IncompatibleAdapterError) as error:
        onnx_adapter(export.directory, adapter, tmp_path / "x.onnx_adapter")
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_adapter_file_refuses_missing_tensors_merged_graphs_and_existing_files(
    exports, siblings, tmp_path
) -> None:
    # Without trained biases, the graph's biases would silently keep the exported adapter's values.
    no_biases = siblings("bert-cls", bias="none")
    missing = "trained tensors of the graph missing from the adapter .*query.bias"
    with pytest.raises(IncompatibleAdapterError, match=missing):
        onnx_adapter(exports["bert-adapter"].directory, no_biases, tmp_path / "x.onnx_adapter")
    qv, file = adapter_dir(exports.root, "llama-qv"), tmp_path / "x.onnx_adapter"
    with pytest.raises(CheckpointError, match="merged mode"):
        onnx_adapter(exports["llama-merged"].directory, qv, file)
    file.write_text("keep me")
    with pytest.raises(OutputError, match="exists"):
        onnx_adapter(exports["llama-adapter"].directory, qv, file)
    assert file.read_text() == "keep me"
    with pytest.raises(CheckpointError, match=MANIFEST_NAME):
        onnx_adapter(tmp_path, qv, tmp_path / "y.onnx_adapter")
    # An output that cannot be written is one OutputError, from our check or from ONNX Runtime's own writer.
    (tmp_path / "a-file").write_text("")
    for unwritable in (tmp_path / "a-file" / "x.onnx_adapter", Path("/proc/x.onnx_adapter")):
        with pytest.raises(OutputError, match="cannot be written"):
            onnx_adapter(exports["llama-adapter"].directory, qv, unwritable)
    # Not even --force writes over the graph or into an input directory.
    graph = exports["llama-adapter"].directory / "model.onnx"
    before = graph.read_bytes()
    for inside in (graph, qv / "x.onnx_adapter"):
        with pytest.raises(OutputError, match="overlaps the input"):
            onnx_adapter(exports["llama-adapter"].directory, qv, inside, OnnxAdapterOptions(force=True))
    assert graph.read_bytes() == before and not (qv / "x.onnx_adapter").exists()


def test_verify_onnx_catches_the_wrong_adapter(exports) -> None:
    export = exports["llama-adapter"]
    assert verify_onnx(export.directory, export.base, export.adapters).passed
    report = verify_onnx(export.directory, export.base, [adapter_dir(exports.root, "llama-qkv-b")])
    assert [c.passed for c in report.checks] == [True, False, False]
    merged = exports["llama-merged"]
    report = verify_onnx(merged.directory, merged.base, merged.adapters[:1])  # one of the two folded adapters
    assert not report.passed and all(not c.passed for c in report.checks if c.name.startswith("onnx "))


def test_verify_onnx_catches_one_lambda_one_percent_off(exports, tmp_path) -> None:
    export = exports["llama-adapter"]
    broken = tmp_path / "broken"
    shutil.copytree(export.directory, broken)
    model = onnx.load(str(broken / "model.onnx"))
    name = lambda_input("model.layers.1.self_attn.q_proj", "b")
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor) * np.float32(1.01), name))
    onnx.save(model, str(broken / "model.onnx"))
    report = verify_onnx(broken, export.base, export.adapters)
    assert [c.passed for c in report.checks] == [True, False, False]


def test_verify_onnx_reports_a_graph_onnx_runtime_cannot_load(exports, tmp_path) -> None:
    export = exports["llama-adapter"]
    broken = tmp_path / "broken"
    shutil.copytree(export.directory, broken)
    (broken / "model.onnx").write_bytes(b"not a graph")
    report = verify_onnx(broken, export.base, export.adapters)
    assert [(c.name, c.passed) for c in report.checks] == [("graph loads in ONNX Runtime", False)]
    assert "ONNX Runtime failed" in report.checks[0].detail


def test_refusals_before_any_export(fixture_root, tmp_path) -> None:
    base, qv = base_dir(fixture_root, "llama-qv"), adapter_dir(fixture_root, "llama-qv")
    qkv = adapter_dir(fixture_root, "llama-qkv-b")
    with pytest.raises(AdapterError, match="exactly one adapter"):
        export_onnx(base, [qv, qkv], tmp_path / "a", OnnxOptions(mode="adapter"))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM is not a sequence-classification model"):
        export_onnx(base, [qv], tmp_path / "b", OnnxOptions(task="sequence-classification"))
    with pytest.raises(IncompatibleAdapterError, match="has no 2-D weight"):
        export_onnx(base, [adapter_dir(fixture_root, "gpt2-attn")], tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("")
    with pytest.raises(OutputError, match="not empty"):
        export_onnx(base, [qv], tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # nothing partial left behind
    for bad in ({"mode": "lora"}, {"task": "translation"}, {"opset": 17}, {"opset": 24}):
        with pytest.raises(ValueError):
            OnnxOptions(**bad)


@pytest.mark.parametrize(
    ("fixture", "task"),
    [("llama-qv", "causal-lm"), ("gpt2-attn", "causal-lm"), ("bert-cls", "sequence-classification")],
)
def test_task_from_architecture(fixture_root, fixture: str, task: str) -> None:
    assert resolve_task(base_dir(fixture_root, fixture), "auto").name == task
    assert resolve_task(base_dir(fixture_root, fixture), "feature-extraction").name == "feature-extraction"


def test_16bit_base_projections_are_peft_s(fixture_root) -> None:
    """On a bfloat16 base, the graph's projections are the ones PEFT's bfloat16 model trained with."""
    name = "llama-bf16-all"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    resolution = MODES["adapter"].resolve(
        ShardedTensorIndex.from_dir(base), [load_adapter(adapter)], Rounding.FMA
    )
    (pinned,) = resolution.adapters
    peft_model = load_peft(base, [adapter]).base_model
    assert torch.equal(pinned.vera_A, peft_model.vera_A["a0"].float())
    assert torch.equal(pinned.vera_B, peft_model.vera_B["a0"].float())
    # And the rounding mattered: the float32 projections regenerated from the key are not these.
    key, r = pinned.config.projection_prng_key, pinned.config.r
    raw_A, _ = generate_projections(key, r, pinned.vera_A.shape[1], pinned.vera_B.shape[0])
    assert not torch.equal(raw_A, pinned.vera_A)


@pytest.mark.parametrize(
    "first",
    ["", "import vera_export.onnx.export; ", "from vera_export import onnx; "],
    ids=["alone", "after the module", "after the package"],
)
def test_top_level_onnx_names_are_the_functions(first: str) -> None:
    """The ONNX names load lazily; whatever was imported first, each is the function, never a submodule."""
    names = "export_onnx, onnx_adapter, verify_onnx"
    code = f"{first}from vera_export import {names}; assert all(callable(f) for f in ({names}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
