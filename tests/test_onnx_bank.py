"""Bank graphs: one batch, one adapter per row, every row checked against PEFT's model of that row's adapter.

Three banks of three adapters are exported once per module, on first use (about 10 s each):

- llama: two fixtures and a sibling; `llama-qv` adapts q and v only, the others k too (zero lambdas there);
- bert: a classifier with trained biases and a `modules_to_save` head, selected per row;
- gpt2: `Conv1D` layers (`fan_in_fan_out`) with trained biases, and a `Conv1D` and a `LayerNorm` in
  `modules_to_save`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from torch import nn

from fixtures.build import ADAPTERS, randomize_trainables
from tests.helpers import adapter_dir, base_dir, load_base, load_peft
from vera_export import AdapterError, CheckpointError, IncompatibleAdapterError, OnnxOptions
from vera_export.layers import VeraLinear
from vera_export.onnx.adapter_file import onnx_adapter
from vera_export.onnx.bank import RowSelectedLayerNorm, RowSelectedLinear, RowSelection, VeraBankLinear
from vera_export.onnx.export import OnnxReport, export_onnx
from vera_export.onnx.graph import INDEX_GUARD
from vera_export.onnx.manifest import MANIFEST_NAME, Manifest
from vera_export.onnx.runtime import ORT_ERRORS as _ORT_ERRORS
from vera_export.onnx.runtime import session
from vera_export.onnx.signature import (
    ADAPTER_INDEX,
    ADAPTERS_AXIS,
    VERA_A,
    VERA_B,
    lambda_input,
    tensor_input,
)
from vera_export.onnx.verify import verify_onnx

# As in test_onnx: ONNX Runtime's float32 graph against PEFT's float32 model differ by a few float32 roundoffs of
# outputs of magnitude about 1. Each adapter moves the outputs by more than 1e-2 from every other (checked below).
ATOL, RTOL = 2e-6, 1e-5
APART = 1e-2
# Neither shape is the export's example (2 x 8); adapters repeat and come in another order than exported.
BATCHES = [((4, 6), [2, 0, 1, 0]), ((1, 9), [1])]

# GPT-2 with Conv1D and LayerNorm tensors in modules_to_save, on top of gpt2-attn's trained biases.
_GPT2_BANK = {"target_modules": ["c_attn", "attn.c_proj", "c_fc"], "modules_to_save": ["mlp.c_proj", "ln_f"]}


@dataclass(frozen=True)
class BankSpec:
    fixture: str  # the fixture whose base and config the bank uses
    adapters: tuple[tuple[str, int], ...]  # (fixture, 0) is the fixture itself; (fixture, seed) a sibling
    changes: tuple[tuple[str, object], ...] = ()  # config changes of the siblings


SPECS = {
    "llama": BankSpec("llama-qv", (("llama-qv", 0), ("llama-qkv-b", 0), ("llama-qv", 101))),
    "bert": BankSpec("bert-cls", (("bert-cls", 0), ("bert-cls", 101), ("bert-cls", 102))),
    "gpt2": BankSpec(
        "gpt2-attn", (("gpt2-attn", 101), ("gpt2-attn", 102), ("gpt2-attn", 103)), tuple(_GPT2_BANK.items())
    ),
}


@dataclass
class BankExport:
    spec: BankSpec
    base: Path
    adapters: list[Path]
    directory: Path
    report: OnnxReport


class Siblings:
    """Other adapters of a fixture's config, made with PEFT as the fixtures are, with other random trainables."""

    def __init__(self, root: Path, out: Path) -> None:
        self.root, self.out, self.built = root, out, {}

    def __call__(self, fixture: str, seed: int = 0, **changes) -> Path:
        if seed == 0 and not changes:
            return adapter_dir(self.root, fixture)
        key = repr((fixture, seed, sorted(changes.items())))
        if key not in self.built:
            from peft import VeraConfig, get_peft_model

            spec = ADAPTERS[fixture]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = VeraConfig(**{**spec.config, **changes}, task_type=spec.task_type)
                model = get_peft_model(load_base(base_dir(self.root, fixture)), config)
            randomize_trainables(model, seed)
            self.built[key] = self.out / f"{fixture}-{len(self.built)}"
            model.save_pretrained(self.built[key])
        return self.built[key]


class Banks:
    def __init__(self, siblings: Siblings, out: Path) -> None:
        self.siblings, self.out, self.done = siblings, out, {}

    def adapters(self, key: str) -> list[Path]:
        spec = SPECS[key]
        return [self.siblings(fixture, seed, **dict(spec.changes)) for fixture, seed in spec.adapters]

    def __getitem__(self, key: str) -> BankExport:
        if key not in self.done:
            spec = SPECS[key]
            base, adapters = base_dir(self.siblings.root, spec.fixture), self.adapters(key)
            report = export_onnx(base, adapters, self.out / key, OnnxOptions(mode="bank"))
            self.done[key] = BankExport(spec, base, adapters, self.out / key, report)
        return self.done[key]


@pytest.fixture(scope="module")
def siblings(fixture_root, tmp_path_factory) -> Siblings:
    return Siblings(fixture_root, tmp_path_factory.mktemp("bank-siblings"))


@pytest.fixture(scope="module")
def banks(siblings, tmp_path_factory) -> Banks:
    return Banks(siblings, tmp_path_factory.mktemp("banks"))


def _batches(vocab_size: int, shapes=BATCHES) -> list[dict[str, np.ndarray]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for (rows, length), index in shapes:
        input_ids = torch.randint(0, vocab_size, (rows, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, : length // 3] = 0
        batches.append(
            {
                "input_ids": input_ids.numpy(),
                "attention_mask": attention_mask.numpy(),
                ADAPTER_INDEX: np.array(index, dtype=np.int64),
            }
        )
    return batches


@torch.no_grad()
def _peft_logits(base: Path, adapter: Path, batches) -> list[np.ndarray]:
    """PEFT's unmerged model of one adapter on every row of `batches`."""
    model = load_peft(base, [adapter])
    return [
        model(
            input_ids=torch.from_numpy(b["input_ids"]), attention_mask=torch.from_numpy(b["attention_mask"])
        ).logits.numpy()
        for b in batches
    ]


def _kept(output: np.ndarray, batch, row: int) -> np.ndarray:
    """One row's output at the positions its attention mask keeps (padded ones mean nothing)."""
    if output.ndim == 2:  # [batch, labels]
        return output[row]
    return output[row][batch["attention_mask"][row].astype(bool)]


def _assert_rows_match(got, batches, adapters: list[Path], base: Path) -> None:
    """Row i of each batch equals PEFT's model of adapter `adapter_index[i]`, and no other adapter's."""
    references = [_peft_logits(base, adapter, batches) for adapter in adapters]
    for g, batch, *by_adapter in zip(got, batches, *references):
        for row, k in enumerate(batch[ADAPTER_INDEX]):
            want = torch.from_numpy(_kept(by_adapter[k], batch, row))
            torch.testing.assert_close(torch.from_numpy(_kept(g, batch, row)), want, atol=ATOL, rtol=RTOL)
            # The check can fail: the row is far from what any other adapter computes for it.
            others = [j for j in range(len(adapters)) if j != k]
            assert all(
                np.abs(_kept(g, batch, row) - _kept(by_adapter[j], batch, row)).max() > APART for j in others
            )


def _vocab_size(bank: BankExport) -> int:
    return json.loads((bank.base / "config.json").read_text())["vocab_size"]


def _run(bank: BankExport, batches, run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
    runner = session(bank.directory)
    return [runner.run(None, batch, run_options)[0] for batch in batches]


def _lora(path: Path) -> tuple[ort.RunOptions, ort.LoraAdapter]:
    lora = ort.LoraAdapter()
    lora.Load(str(path))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(lora)
    return run_options, lora  # the LoraAdapter must outlive the runs; RunOptions does not hold on to it


@pytest.mark.parametrize("key", SPECS)
def test_every_row_matches_peft_for_its_adapter(banks, key: str) -> None:
    bank = banks[key]
    batches = _batches(_vocab_size(bank))
    _assert_rows_match(_run(bank, batches), batches, bank.adapters, bank.base)


@pytest.mark.parametrize("key", SPECS)
def test_export_verified_every_row(banks, key: str) -> None:
    verification = banks[key].report.verification
    assert verification is not None and verification.passed, [c.line() for c in verification.checks]
    outputs = [c for c in verification.checks if c.name.startswith("onnx ")]
    assert [c.name.partition(", ")[2] for c in outputs] == [
        "rows run adapters [2, 1, 0]",
        "rows run adapters [0]",
    ]
    assert all(c.max_abs_error <= c.tolerance < 1e-5 for c in outputs)


@pytest.mark.parametrize("key", SPECS)
def test_bank_graph_interface(banks, key: str) -> None:
    bank = banks[key]
    path = bank.directory / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in tensors]
    assert [i.name for i in inputs] == ["input_ids", "attention_mask", ADAPTER_INDEX]
    for value, dims in zip(inputs, (["batch", "sequence"], ["batch", "sequence"], ["batch"])):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == dims

    manifest = Manifest.read(bank.directory)
    assert manifest.mode == "bank" and manifest.adapters == [str(a) for a in bank.adapters]
    expected = {lambda_input(m, kind) for m in manifest.layers for kind in "bd"}
    expected |= {tensor_input(name) for name in manifest.replaced}
    runner = session(bank.directory)
    overridable = {i.name: i.shape for i in runner.get_overridable_initializers()}
    assert set(overridable) == expected == set(manifest.overridable)
    for name, shape in overridable.items():
        assert shape[0] == ADAPTERS_AXIS and tensors[name].shape[0] == 3, name
        assert shape == manifest.overridable[name]["shape"]
    # The projections once, as in adapter mode; the guard reads the index before anything else does.
    assert VERA_A in tensors and VERA_B in tensors
    readers = [n for n in model.graph.node if ADAPTER_INDEX in n.input]
    assert INDEX_GUARD in {n.name for n in readers} and all(n.op_type != "Gather" for n in readers)


def test_union_of_layers_has_zero_lambdas_where_an_adapter_adapts_none(banks) -> None:
    """Only llama-qkv-b (row 1) adapts k_proj; the others' lambdas there are zero, their outputs PEFT's (above)."""
    bank = banks["llama"]
    model = onnx.load(str(bank.directory / "model.onnx"))
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "model.layers.0.self_attn.k_proj" in Manifest.read(bank.directory).layers
    for kind in "bd":
        table = tensors[lambda_input("model.layers.0.self_attn.k_proj", kind)]
        assert not table[[0, 2]].any() and table[1].all()


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
    batches = _batches(_vocab_size(bank), [((n + 1, 7), index), ((1, 5), [n - 1])])
    run_options, _keep = _lora(report.output)
    _assert_rows_match(_run(bank, batches, run_options), batches, adapters, bank.base)
    # The guard counts the rows of the tables in use: with 2 adapters, index 2 fails though the export has 3.
    runner = session(bank.directory)
    out_of_range = {**batches[1], ADAPTER_INDEX: np.array([n], dtype=np.int64)}
    with pytest.raises(_ORT_ERRORS, match=INDEX_GUARD):
        runner.run(None, out_of_range, run_options)
    # Without the file, the graph is the exported bank again.
    exported = _batches(_vocab_size(bank))
    _assert_rows_match(_run(bank, exported), exported, bank.adapters, bank.base)


@pytest.mark.parametrize("index", [[3], [0, -1], [-3, 0], [0, 1, 2, 99]], ids=str)
def test_out_of_range_index_is_an_error(banks, index) -> None:
    """ONNX Runtime's Gather alone would take -1 as the last adapter; the graph refuses it, and 3 or more."""
    bank = banks["llama"]
    runner = session(bank.directory)
    (batch,) = _batches(_vocab_size(bank), [((len(index), 5), index)])
    with pytest.raises(_ORT_ERRORS, match=INDEX_GUARD):
        runner.run(None, batch)
    batch[ADAPTER_INDEX] = np.clip(batch[ADAPTER_INDEX], 0, 2)  # in range, the same batch runs
    assert np.isfinite(runner.run(None, batch)[0]).all()


def test_onnx_runtime_gather_alone_would_read_negative_indices_from_the_end() -> None:
    """Why the graph has its own guard: ORT's Gather refuses n, but reads -1 as the last row, silently."""
    helper = onnx.helper
    table = onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["rows"])],
        "gather",
        [helper.make_tensor_value_info("index", onnx.TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, ["batch", 2])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    runner = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(runner.run(None, {"index": np.array([-1])})[0], [[4.0, 5.0]])
    with pytest.raises(_ORT_ERRORS, match="out of data bounds"):
        runner.run(None, {"index": np.array([3])})


def test_verify_onnx_checks_each_row_against_its_adapter(banks) -> None:
    bank = banks["llama"]
    assert verify_onnx(bank.directory, bank.base, bank.adapters).passed
    # Given in another order, rows are checked against other adapters than they run, and fail.
    report = verify_onnx(bank.directory, bank.base, bank.adapters[::-1])
    assert [c.passed for c in report.checks] == [True, False, False]
    # Given only some of them, the other rows would go unchecked: refused.
    with pytest.raises(AdapterError, match="the bank holds 3 adapters and 1 were given"):
        verify_onnx(bank.directory, bank.base, bank.adapters[:1])


def test_refuses_adapters_that_cannot_share_a_bank(fixture_root, siblings, tmp_path) -> None:
    base = base_dir(fixture_root, "llama-qv")
    qv = adapter_dir(fixture_root, "llama-qv")
    other_key = siblings("llama-qv", 301, projection_prng_key=7, save_projection=False)
    other_r = adapter_dir(fixture_root, "llama-all-noproj")
    with pytest.raises(IncompatibleAdapterError) as error:
        export_onnx(base, [qv, other_key, other_r], tmp_path / "a", OnnxOptions(mode="bank"))
    message = str(error.value)
    assert "cannot share one bank (2 problems)" in message
    assert f"{other_key}: projections vera_A / vera_B (regenerated from projection_prng_key 7" in message
    assert f"{other_r}: r is 16, {qv}'s is 8" in message

    bert, bert_cls = base_dir(fixture_root, "bert-cls"), adapter_dir(fixture_root, "bert-cls")
    no_biases = siblings("bert-cls", 302, bias="none")
    with pytest.raises(
        IncompatibleAdapterError, match="does not train .*query.bias.* every adapter of a bank must"
    ):
        export_onnx(bert, [bert_cls, no_biases], tmp_path / "b", OnnxOptions(mode="bank"))
    with pytest.raises(IncompatibleAdapterError, match="has no 2-D weight"):
        export_onnx(
            base, [qv, adapter_dir(fixture_root, "gpt2-attn")], tmp_path / "c", OnnxOptions(mode="bank")
        )
    # A trained tensor in a module a bank cannot select per row (Llama's RMSNorm), found once the model is loaded.
    norm = siblings("llama-qv", 303, modules_to_save=["model.norm"])
    with pytest.raises(
        IncompatibleAdapterError, match=r"only in .*LayerNorm.* model.norm.weight \(LlamaRMSNorm\)"
    ):
        export_onnx(base, [norm, norm], tmp_path / "d", OnnxOptions(mode="bank"))
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind


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


# What the README shows after `vera-export onnx --mode bank --base ./llama --adapter ./alice-vera
# --adapter ./bob-vera --adapter ./carol-vera --output ./llama-bank`; the test runs it as written.
def _readme_example() -> str:
    """The README's bank example, as the README has it: the first Python block after its lead-in line."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    after = readme[readme.index("Three adapters, one batch, one call:") :]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


README_EXAMPLE = _readme_example()


def test_readme_example_runs_three_adapters_in_one_call(banks) -> None:
    bank = banks["llama"]
    scope: dict = {}
    exec(
        README_EXAMPLE.replace('"llama-bank/', f'"{bank.directory}/'),
        scope,
    )
    _assert_rows_match([scope["logits"]], [scope["batch"]], bank.adapters, bank.base)


def _tables(n: int, *shape: int, seed: int) -> nn.Parameter:
    generator = torch.Generator().manual_seed(seed)
    return nn.Parameter(
        torch.randn((n, *shape), generator=generator, dtype=torch.float64), requires_grad=False
    )


def _with_row(layer: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> nn.Module:
    """A copy of `layer` holding one adapter's tensors: what a row of the bank must compute."""
    import copy

    row = copy.deepcopy(layer)
    with torch.no_grad():
        if weight is not None:
            row.weight.copy_(weight)
        if bias is not None:
            row.bias.copy_(bias)
    return row


@pytest.mark.parametrize("tables", ["weight", "bias", "both"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "layernorm", "linear-2d"])
def test_row_selected_layers_compute_each_row_with_its_tensors(kind: str, tables: str) -> None:
    torch.manual_seed(0)
    layer, wrapper, shape = {
        "linear": (nn.Linear(6, 5), RowSelectedLinear, (4, 3, 6)),
        "linear-2d": (nn.Linear(6, 5), RowSelectedLinear, (4, 6)),  # a head on pooled outputs
        "conv1d": (transformers.pytorch_utils.Conv1D(5, 6), RowSelectedLinear, (4, 3, 6)),
        "layernorm": (nn.LayerNorm(6), RowSelectedLayerNorm, (4, 3, 6)),
    }[kind]
    layer = layer.double()
    n = 3
    weight = _tables(n, *layer.weight.shape, seed=1) if tables in ("weight", "both") else None
    bias = _tables(n, *layer.bias.shape, seed=2) if tables in ("bias", "both") else None
    selection = RowSelection()
    bank = wrapper(layer, weight, bias, selection)
    x = torch.randn(shape, dtype=torch.float64)
    index = torch.tensor([2, 0, 2, 1])
    with torch.no_grad(), selection.rows(index):
        got = bank(x)
    for i, k in enumerate(index.tolist()):
        row = _with_row(layer, None if weight is None else weight[k], None if bias is None else bias[k])
        with torch.no_grad():
            torch.testing.assert_close(got[i], row(x[i : i + 1])[0], rtol=1e-12, atol=1e-12)
            assert not torch.allclose(
                got[i], layer(x[i : i + 1])[0], rtol=1e-3, atol=1e-3
            )  # the tables matter


def test_vera_bank_linear_rows_equal_vera_linear_of_their_adapter() -> None:
    torch.manual_seed(0)
    base, r, n = nn.Linear(6, 5).double(), 4, 3
    vera_A, vera_B = torch.randn(r, 8, dtype=torch.float64), torch.randn(7, r, dtype=torch.float64)
    lambda_b, lambda_d = _tables(n, 5, seed=1), _tables(n, r, seed=2)
    selection = RowSelection()
    bank = VeraBankLinear(base, 6, 5, lambda_b, lambda_d, vera_A, vera_B, selection)
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    index = torch.tensor([1, 2, 0, 1])
    with torch.no_grad(), selection.rows(index):
        got = bank(x)
    for i, k in enumerate(index.tolist()):
        single = VeraLinear(base, 6, 5, [(lambda_b[k], lambda_d[k], vera_A, vera_B)])
        with torch.no_grad():
            torch.testing.assert_close(got[i], single(x[i : i + 1])[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="adapter_index"):
        bank(x)  # outside RowSelection.rows()
