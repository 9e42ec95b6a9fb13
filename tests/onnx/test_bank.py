"""Bank graphs: one batch, one adapter per row, every row checked against PEFT's model of that row's adapter; the
bank's PyTorch layers row by row; and the adapters a bank refuses."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import transformers
from torch import nn

from tests.helpers import adapter_dir, base_dir
from tests.onnx.helpers import BANK_SPECS, assert_rows_match, bank_batches, run_graph, vocab_size
from vera_export import IncompatibleAdapterError, OnnxOptions, Rounding, load_adapter
from vera_export.io.index import ShardedTensorIndex
from vera_export.layers import VeraLinear
from vera_export.onnx.bank import (
    RowSelectedLayerNorm,
    RowSelectedLinear,
    RowSelection,
    VeraBankLinear,
    build_bank,
    stack_inputs,
)
from vera_export.onnx.export import export_onnx
from vera_export.onnx.manifest import Manifest
from vera_export.onnx.signature import lambda_input

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("key", BANK_SPECS)
def test_every_row_matches_peft_for_its_adapter(banks, key: str) -> None:
    bank = banks[key]
    batches = bank_batches(vocab_size(bank))
    assert_rows_match(run_graph(bank, batches), batches, bank.adapters, bank.base)


@pytest.mark.parametrize("key", BANK_SPECS)
def test_export_verified_every_row(banks, key: str) -> None:
    verification = banks[key].report.verification
    assert verification is not None and verification.passed, [c.line() for c in verification.checks]
    outputs = [c for c in verification.checks if c.name.startswith("onnx ")]
    assert [c.name.partition(", ")[2] for c in outputs] == [
        "rows run adapters [2, 1, 0]",
        "rows run adapters [0]",
    ]
    assert all(c.max_abs_error <= c.tolerance < 1e-5 for c in outputs)


def test_union_of_layers_has_zero_lambdas_where_an_adapter_adapts_none(banks) -> None:
    """Only llama-qkv-b (row 1) adapts k_proj; the others' lambdas there are zero, their outputs PEFT's (above)."""
    bank = banks["llama"]
    model = onnx.load(str(bank.directory / "model.onnx"))
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "model.layers.0.self_attn.k_proj" in Manifest.read(bank.directory).layers
    for kind in "bd":
        table = tensors[lambda_input("model.layers.0.self_attn.k_proj", kind)]
        assert not table[[0, 2]].any() and table[1].all()


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


# What the docs show after `vera-export onnx --mode bank --base ./llama --adapter ./alice-vera
# --adapter ./bob-vera --adapter ./carol-vera --output ./llama-bank`; the test runs it as written.
def _bank_example() -> str:
    """The docs' bank example, as they have it: the first Python block after its lead-in line (in README.md or
    in a page of docs/, wherever it is)."""
    root = Path(__file__).parents[2]
    lead_in = "Three adapters, one batch, one call:"
    (page,) = [
        p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if lead_in in p.read_text()
    ]
    after = page.read_text()[page.read_text().index(lead_in) :]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_bank_example_runs_three_adapters_in_one_call(banks) -> None:
    bank = banks["llama"]
    scope: dict = {}
    exec(
        _bank_example().replace('"llama-bank/', f'"{bank.directory}/'),
        scope,
    )
    assert_rows_match([scope["logits"]], [scope["batch"]], bank.adapters, bank.base)


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


def test_row_selection_picks_each_row_s_entry_and_broadcasts_it() -> None:
    selection = RowSelection()
    table = torch.arange(12.0).reshape(3, 4)  # 3 adapters, a vector of 4 each
    with pytest.raises(RuntimeError, match="outside RowSelection.rows"):
        selection.pick(table)
    with selection.rows(torch.tensor([2, 0, 2])):
        assert torch.equal(selection.pick(table), table[[2, 0, 2]])
        rows = selection.broadcast(table, 3)  # for x of [batch, sequence, features]
        assert rows.shape == (3, 1, 4) and torch.equal(rows[:, 0], table[[2, 0, 2]])
    assert selection.index is None  # cleared on the way out


def test_stacked_tables_hold_each_adapter_s_tensors_and_zeros_where_it_adapts_nothing(
    fixture_root: Path,
) -> None:
    qv, qkv = (load_adapter(adapter_dir(fixture_root, name)) for name in ("llama-qv", "llama-qkv-b"))
    k = "model.layers.0.self_attn.k_proj"
    shapes = {lambda_input(k, "b"): (32,), lambda_input(k, "d"): (8,), lambda_input(Q0, "b"): (64,)}
    tables = stack_inputs([qv, qkv, qv], shapes, torch.float64)
    assert {name: tuple(t.shape) for name, t in tables.items()} == {n: (3, *s) for n, s in shapes.items()}
    assert all(t.dtype == torch.float64 for t in tables.values())
    assert not tables[lambda_input(k, "b")][[0, 2]].any()
    assert torch.equal(tables[lambda_input(k, "b")][1], qkv.layers[k].lambda_b.double())
    for row, adapter in enumerate((qv, qkv, qv)):
        assert torch.equal(tables[lambda_input(Q0, "b")][row], adapter.layers[Q0].lambda_b.double())


def test_a_bank_needs_an_adapter_and_resolves_the_union_of_layers(fixture_root: Path) -> None:
    tensors = ShardedTensorIndex.from_dir(base_dir(fixture_root, "llama-qv")).tensors
    with pytest.raises(IncompatibleAdapterError, match="a bank needs at least one adapter"):
        build_bank([], tensors, Rounding.FMA)
    qv, qkv = (load_adapter(adapter_dir(fixture_root, name)) for name in ("llama-qv", "llama-qkv-b"))
    bank = build_bank([qv, qkv], tensors, Rounding.FMA)
    assert set(bank.layers) == set(qv.layers) | set(qkv.layers) > set(qv.layers)
    assert [a.path for a in bank.adapters] == [qv.path, qkv.path] and bank.replaced == []
    assert all(torch.equal(a.vera_A, bank.projections.vera_A) for a in bank.adapters)
