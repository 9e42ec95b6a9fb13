"""The export modes as values: what each resolves from the adapters, its signature, its verification inputs and
which adapters compute which rows of the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import adapter_dir, base_dir, load_peft
from vera_export import AdapterError, load_adapter
from vera_export.io.index import ShardedTensorIndex
from vera_export.model_check import model_inputs
from vera_export.modeling import load_model
from vera_export.onnx.modes import MODES, TaskOutput
from vera_export.onnx.signature import ADAPTER_INDEX, TASKS
from vera_export.options import ONNX_MODES, ONNX_TASKS
from vera_export.projections import Rounding, generate_projections


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


def test_the_modes_and_tasks_are_the_options_choices() -> None:
    assert tuple(MODES) == ONNX_MODES and tuple(TASKS) == ONNX_TASKS
    assert all(mode.name == name for name, mode in MODES.items())
    assert {name: mode.file_adapters for name, mode in MODES.items()} == {
        "merged": 0,
        "adapter": 1,
        "bank": None,
    }
    assert [name for name, mode in MODES.items() if mode.stacked or mode.fewer_layers_ok] == ["bank"]


def test_adapter_mode_exports_exactly_one_adapter(fixture_root: Path) -> None:
    index = ShardedTensorIndex.from_dir(base_dir(fixture_root, "llama-qv"))
    two = [load_adapter(adapter_dir(fixture_root, name)) for name in ("llama-qv", "llama-qkv-b")]
    with pytest.raises(AdapterError, match="adapter mode exports exactly one adapter, got 2; .* --mode bank"):
        MODES["adapter"].resolve(index, two, Rounding.FMA)
    with pytest.raises(AdapterError, match="got 0"):
        MODES["adapter"].resolve(index, [], Rounding.FMA)


def test_what_each_mode_resolves(fixture_root: Path) -> None:
    index = ShardedTensorIndex.from_dir(base_dir(fixture_root, "bert-cls"))
    adapter = load_adapter(adapter_dir(fixture_root, "bert-cls"))
    merged = MODES["merged"].resolve(index, [adapter], Rounding.FMA)
    assert merged.projections is None and merged.layers == merged.replaced == [] and merged.bank is None
    single = MODES["adapter"].resolve(index, [adapter], Rounding.FMA)
    assert single.layers == list(adapter.layers) and single.replaced == list(adapter.replacements)
    assert not single.projections.stored and single.adapters[0].vera_A is single.projections.vera_A
    bank = MODES["bank"].resolve(index, [adapter, adapter], Rounding.FMA)
    assert bank.bank is not None and bank.layers == list(adapter.layers) and len(bank.adapters) == 2


def test_a_bank_s_signature_adds_the_adapter_index() -> None:
    task = TASKS["causal-lm"]
    assert MODES["merged"].signature(task).input_names == MODES["adapter"].signature(task).input_names
    bank = MODES["bank"].signature(task)
    assert bank.input_names == ["input_ids", "attention_mask", ADAPTER_INDEX]
    assert (
        bank.inputs[2].dtype == torch.int64 and bank.inputs[2].axes == ("batch",) and bank.inputs[2].fill == 0
    )


def test_verification_inputs() -> None:
    assert all(
        torch.equal(a[k], b[k])
        for a, b in zip(MODES["adapter"].verification_inputs(256, 1), model_inputs(256))
        for k in a
    )
    for n, first_rows in ((1, [0, 0]), (3, [2, 1, 0]), (5, [4, 3, 2, 1, 0])):
        batches = MODES["bank"].verification_inputs(256, n)
        assert [b[ADAPTER_INDEX].tolist() for b in batches] == [first_rows, [0]]
        assert [tuple(b["input_ids"].shape) for b in batches] == [(len(first_rows), 7), (1, 16)]
        # Every adapter runs a row, and the second row of the first batch is left-padded.
        assert set(first_rows) == set(range(n))
        assert (
            batches[0]["attention_mask"][1, :2].eq(0).all()
            and batches[0]["attention_mask"][1, 2:].eq(1).all()
        )


def test_bank_rows_are_checked_against_their_own_adapter_alone() -> None:
    adapters = ["a0", "a1", "a2"]  # any objects: the groups hold them as given
    batch = {ADAPTER_INDEX: torch.tensor([2, 0, 2, 0])}
    groups = MODES["bank"].row_groups(batch, adapters)
    assert [(group, rows.tolist()) for group, rows in groups] == [(["a0"], [1, 3]), (["a2"], [0, 2])]
    for name in ("merged", "adapter"):
        assert MODES[name].row_groups({}, adapters) == [(adapters, None)]


def test_task_output_returns_the_task_s_tensor(fixture_root: Path) -> None:
    model = load_model(base_dir(fixture_root, "llama-qv"), torch.float32)
    ids, mask = torch.tensor([[3, 1, 4, 1]]), torch.ones(1, 4, dtype=torch.int64)
    with torch.no_grad():
        logits = TaskOutput(model, TASKS["causal-lm"])(ids, mask)
        hidden = TaskOutput(model, TASKS["feature-extraction"])(ids, mask)
        assert torch.equal(logits, model(input_ids=ids, attention_mask=mask).logits)
        assert torch.equal(hidden, model.model(input_ids=ids, attention_mask=mask).last_hidden_state)
