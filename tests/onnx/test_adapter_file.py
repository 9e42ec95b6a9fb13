"""`onnx-adapter`: another adapter (or a whole bank) as an ONNX Runtime adapter file, checked against the graph's
manifest without the base, and swapped in per run to compute what PEFT computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.helpers import adapter_dir
from tests.onnx.helpers import (
    ADAPTER_EXPORTS,
    SIBLING,
    assert_matches,
    assert_rows_match,
    bank_batches,
    lora_run_options,
    peft_outputs,
    run_graph,
    token_batches,
    vocab_size,
)
from vera_export import (
    CheckpointError,
    IncompatibleAdapterError,
    OnnxAdapterOptions,
    OutputError,
    load_adapter,
)
from vera_export.onnx.adapter_file import adapter_values, onnx_adapter, write_adapter_file
from vera_export.onnx.graph import INDEX_GUARD
from vera_export.onnx.manifest import MANIFEST_NAME, Manifest
from vera_export.onnx.runtime import ORT_ERRORS, session
from vera_export.onnx.signature import ADAPTER_INDEX, tensor_input


@pytest.mark.parametrize("key", ADAPTER_EXPORTS)
def test_swapped_adapter_matches_peft(exports, siblings, tmp_path, key: str) -> None:
    export = exports[key]
    other = siblings(export.spec.fixture, SIBLING)
    report = onnx_adapter(export.directory, other, tmp_path / "other.onnx_adapter")
    assert report.bytes_written < 100_000
    batches = token_batches(vocab_size(export))
    lora = ort.LoraAdapter()
    lora.Load(str(report.output))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(lora)
    swapped = run_graph(export, batches, run_options)
    assert_matches(swapped, peft_outputs(export, [other], batches), batches)
    # The swap changed the outputs, and a run without the adapter is the exported adapter again.
    defaults = peft_outputs(export, None, batches)
    assert max(np.abs(s - d).max() for s, d in zip(swapped, defaults)) > 1e-2
    assert_matches(run_graph(export, batches), defaults, batches)


def test_adapter_file_holds_only_trained_tensors(exports, siblings, tmp_path) -> None:
    export = exports["bert-adapter"]
    report = onnx_adapter(export.directory, siblings("bert-cls", SIBLING), tmp_path / "a.onnx_adapter")
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
    adapter = adapter_dir(exports.root, fixture) if changes is None else siblings(fixture, SIBLING, **changes)
    with pytest.raises(IncompatibleAdapterError) as error:
        onnx_adapter(export.directory, adapter, tmp_path / "x.onnx_adapter")
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_adapter_file_refuses_missing_tensors_merged_graphs_and_existing_files(
    exports, siblings, tmp_path
) -> None:
    # Without trained biases, the graph's biases would silently keep the exported adapter's values.
    no_biases = siblings("bert-cls", SIBLING, bias="none")
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
    for inside, refusal in (
        (graph, "only .onnx_adapter files"),
        (qv / "x.onnx_adapter", "overlaps the input"),
    ):
        with pytest.raises(OutputError, match=refusal):
            onnx_adapter(exports["llama-adapter"].directory, qv, inside, OnnxAdapterOptions(force=True))
    assert graph.read_bytes() == before and not (qv / "x.onnx_adapter").exists()


def test_a_new_adapter_file_may_go_into_the_models_folder(exports, tmp_path) -> None:
    """ONNX Runtime GenAI's layout keeps adapter files beside the graph: a new one is written there, an existing
    one only with --force, and nothing else of the folder changes."""
    model = tmp_path / "model"
    shutil.copytree(exports["llama-adapter"].directory, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    qv = adapter_dir(exports.root, "llama-qv")
    report = onnx_adapter(model, qv, model / "adapters" / "qv.onnx_adapter")
    assert report.output.is_file() and report.bytes_written == report.output.stat().st_size
    with pytest.raises(OutputError, match="exists"):
        onnx_adapter(model, qv, model / "adapters" / "qv.onnx_adapter")
    onnx_adapter(model, qv, model / "adapters" / "qv.onnx_adapter", OnnxAdapterOptions(force=True))
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in (model / "adapters").iterdir()) == ["qv.onnx_adapter"]  # no staging left


@pytest.mark.parametrize(
    ("key", "members"),
    [
        # Five adapters for a bank exported with three: the tables' leading axis is dynamic.
        pytest.param(
            "llama",
            [("llama-qv", 201), ("llama-qkv-b", 0), ("llama-qv", 202), ("llama-qv", 0), ("llama-qv", 203)],
            id="llama, 5 adapters",
        ),
        # Two for three, with trained biases and heads.
        pytest.param("bert", [("bert-cls", 201), ("bert-cls", 0)], id="bert, 2 adapters"),
    ],
)
def test_adapter_file_replaces_the_bank(banks, siblings, tmp_path, key: str, members) -> None:
    bank = banks[key]
    adapters = [siblings(fixture, seed) for fixture, seed in members]
    report = onnx_adapter(bank.directory, adapters, tmp_path / "bank.onnx_adapter")
    parameters = ort.AdapterFormat.read_adapter(str(report.output)).get_parameters()
    assert set(parameters) == set(Manifest.read(bank.directory).overridable)
    n = len(adapters)
    index = [*range(n - 1, -1, -1), 0]
    batches = bank_batches(vocab_size(bank), [((n + 1, 7), index), ((1, 5), [n - 1])])
    run_options, _keep = lora_run_options(report.output)
    assert_rows_match(run_graph(bank, batches, run_options), batches, adapters, bank.base)
    # The guard counts the rows of the tables in use: with 2 adapters, index 2 fails though the export has 3.
    runner = session(bank.directory)
    out_of_range = {**batches[1], ADAPTER_INDEX: np.array([n], dtype=np.int64)}
    with pytest.raises(ORT_ERRORS, match=INDEX_GUARD):
        runner.run(None, out_of_range, run_options)
    # Without the file, the graph is the exported bank again.
    exported = bank_batches(vocab_size(bank))
    assert_rows_match(run_graph(bank, exported), exported, bank.adapters, bank.base)


def test_adapter_file_refuses_what_does_not_fit_the_bank(banks, siblings, tmp_path) -> None:
    bank, file = banks["llama"], tmp_path / "x.onnx_adapter"
    other_key = siblings("llama-qv", 301, projection_prng_key=7, save_projection=False)
    more_layers = siblings("llama-qv", 304, target_modules=["q_proj", "v_proj", "o_proj"])
    with pytest.raises(IncompatibleAdapterError) as error:
        onnx_adapter(bank.directory, [bank.adapters[0], other_key, more_layers], file)
    message = str(error.value)
    assert f"{other_key}: does not fit" in message and "differ from the graph's" in message
    assert f"{more_layers}: does not fit" in message
    assert (
        "adapted layers of the adapter that the graph does not have: model.layers.0.self_attn.o_proj"
        in message
    )
    assert str(bank.adapters[0]) + ":" not in message
    with pytest.raises(IncompatibleAdapterError, match="at least one adapter"):
        onnx_adapter(bank.directory, [], file)
    # A graph exported in adapter mode takes one adapter's values, not a bank.
    single = tmp_path / "single"
    shutil.copytree(bank.directory, single)
    manifest = json.loads((single / MANIFEST_NAME).read_text())
    (single / MANIFEST_NAME).write_text(json.dumps({**manifest, "mode": "adapter"}))
    with pytest.raises(CheckpointError, match="adapter mode and takes one adapter, got 3"):
        onnx_adapter(single, bank.adapters, file)
    assert not file.exists()


def test_adapter_values_are_the_graph_s_overridable_inputs_in_its_dtypes(exports) -> None:
    """For the exported adapter itself, the values are the graph's own defaults, bit for bit."""
    export = exports["bert-adapter"]
    manifest = Manifest.read(export.directory)
    values = adapter_values(manifest, [load_adapter(export.adapters[0])])
    assert values.keys() == manifest.overridable.keys()
    model = onnx.load(str(export.directory / "model.onnx"))
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, value in values.items():
        assert value.dtype == np.dtype(manifest.overridable[name]["dtype"])
        np.testing.assert_array_equal(value, defaults[name], err_msg=name)
    with pytest.raises(
        CheckpointError, match="^the graph was exported in merged mode, which has nothing to swap"
    ):
        adapter_values(Manifest.read(exports["bert-merged"].directory), [load_adapter(export.adapters[0])])


def test_an_adapter_file_reads_back_as_written(tmp_path: Path) -> None:
    values = {
        "vera.a.lambda_b": np.arange(6, dtype=np.float32).reshape(2, 3),
        "vera.b.bias": np.array([1.5, -2.0], dtype=np.float16),
    }
    write_adapter_file(values, tmp_path / "x.onnx_adapter")
    parameters = ort.AdapterFormat.read_adapter(str(tmp_path / "x.onnx_adapter")).get_parameters()
    assert parameters.keys() == values.keys()
    for name, value in values.items():
        np.testing.assert_array_equal(parameters[name].numpy(), value)
        assert parameters[name].numpy().dtype == value.dtype
    with pytest.raises(OutputError, match="x.onnx_adapter: cannot be written"):
        write_adapter_file(values, tmp_path / "missing" / "x.onnx_adapter")
