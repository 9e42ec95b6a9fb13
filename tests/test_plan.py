"""The plan: which weights get which deltas and which tensors are replaced, keyed by each adapter itself, with
every conflict refused before a weight is read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import adapter_dir, assert_clean_failure, base_dir, cli_merge, digest
from vera_export.adapter import VeraAdapter, load_adapter
from vera_export.errors import IncompatibleAdapterError
from vera_export.io.index import ShardedTensorIndex
from vera_export.plan import Projections, build_plan, pin_projections, resolve_projections
from vera_export.projections import Rounding, generate_projections
from vera_export.targets import match_layers

Q0 = "model.layers.0.self_attn.q_proj"


def _tensors(fixture_root: Path, name: str) -> dict:
    return ShardedTensorIndex.from_dir(base_dir(fixture_root, name)).tensors


def _meta(tensors: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The base's tensors as meta tensors, in `dtype` if given (a model loaded in another dtype)."""
    return {n: torch.empty(i.shape, dtype=dtype or i.dtype, device="meta") for n, i in tensors.items()}


def test_the_same_directory_loaded_twice_is_two_adapters(fixture_root: Path) -> None:
    first, second = (load_adapter(adapter_dir(fixture_root, "llama-qv")) for _ in range(2))
    plan = build_plan([first, second], _tensors(fixture_root, "llama-qv"))
    assert list(plan.projections) == [first, second]
    assert plan.deltas and all(len(deltas) == 2 for deltas in plan.deltas.values())
    for a, b in plan.deltas.values():
        assert all(torch.equal(x, y) for x, y in zip(a.factors(), b.factors()))


@pytest.mark.parametrize("name", ["llama-qv", "gpt2-attn"])
def test_layer_factors_are_the_vera_delta_by_hand(fixture_root: Path, name: str) -> None:
    """`left @ right` is diag(lambda_b) vera_B[:out] diag(lambda_d) vera_A[:, :in], in the weight's own layout."""
    tensors = _tensors(fixture_root, name)
    plan = build_plan([load_adapter(adapter_dir(fixture_root, name))], tensors)
    for weight, (delta,) in plan.deltas.items():
        t, p = delta.target, delta.projections
        by_hand = (
            torch.diag(delta.lambda_b.double())
            @ p.vera_B[: t.out_features].double()
            @ torch.diag(delta.lambda_d.double())
            @ p.vera_A[:, : t.in_features].double()
        )
        left, right = delta.factors()
        assert (left @ right).shape == tensors[weight].shape
        expected = by_hand.T if t.fan_in_fan_out else by_hand
        torch.testing.assert_close(left @ right, expected, rtol=1e-12, atol=1e-15)


def test_projection_bounds_are_the_smallest_and_largest_magnitudes() -> None:
    projections = Projections(torch.tensor([[0.0, -3.0], [0.25, 1.0]]), torch.tensor([[-0.5], [2.0]]), True)
    assert (projections.floor, projections.ceiling) == (0.25, 3.0)


def test_pinned_projections_survive_a_model_loaded_in_another_dtype(fixture_root: Path) -> None:
    """Regenerated on a bfloat16 checkpoint, PEFT's projections are rounded to bfloat16; a float32 copy of the model
    would regenerate them unrounded, unless the plan's are pinned."""
    name = "llama-bf16-all"
    adapter = load_adapter(adapter_dir(fixture_root, name))
    tensors = _tensors(fixture_root, name)
    plan = build_plan([adapter], tensors)
    (pinned,) = pin_projections([adapter], plan)
    assert pinned is not adapter and adapter.vera_A is None
    assert (
        pinned.vera_A is plan.projections[adapter].vera_A
        and pinned.vera_B is plan.projections[adapter].vera_B
    )
    as_float32 = _meta(tensors, torch.float32)
    again = build_plan([pinned], as_float32).projections[pinned]
    assert again.stored and torch.equal(again.vera_A, plan.projections[adapter].vera_A)
    unpinned = build_plan([adapter], as_float32).projections[adapter]
    assert not torch.equal(unpinned.vera_A, plan.projections[adapter].vera_A)  # what pinning prevents


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_regenerated_projections_are_rounded_to_a_16_bit_base(fixture_root: Path, dtype: torch.dtype) -> None:
    adapter = load_adapter(adapter_dir(fixture_root, "llama-all-noproj"))
    tensors = _meta(_tensors(fixture_root, "llama-all-noproj"), dtype)
    layers = match_layers(adapter, {n: tuple(t.shape) for n, t in tensors.items()})
    for rounding in Rounding:
        projections = resolve_projections(adapter, tensors, layers, rounding)
        vera_A, vera_B = generate_projections(1234, 16, 96, 96, rounding)
        assert not projections.stored and projections.vera_A.dtype == torch.float32
        assert torch.equal(projections.vera_A, vera_A.to(dtype).float())
        assert torch.equal(projections.vera_B, vera_B.to(dtype).float())


def test_stored_projections_too_small_for_the_base_are_refused(fixture_root: Path) -> None:
    adapter = load_adapter(adapter_dir(fixture_root, "llama-qv"))
    small = adapter.with_projections(adapter.vera_A[:, :10], adapter.vera_B)
    with pytest.raises(IncompatibleAdapterError, match=r"too small for the base's layers \(need in >= 64"):
        build_plan([small], _tensors(fixture_root, "llama-qv"))


def test_a_tensor_both_adapted_and_replaced_is_refused(fixture_root: Path) -> None:
    tensors = _tensors(fixture_root, "llama-qv")
    adapter = load_adapter(adapter_dir(fixture_root, "llama-qv"))
    both = dataclasses.replace(
        adapter, replacements={f"{Q0}.weight": torch.zeros(tensors[f"{Q0}.weight"].shape)}
    )
    with pytest.raises(IncompatibleAdapterError, match=f"tensors {Q0}.weight are both adapted and replaced"):
        build_plan([both], tensors)
    # Also when two adapters do it between them.
    v_only = {m: layer for m, layer in adapter.layers.items() if m.endswith("v_proj")}
    replaces = dataclasses.replace(both, layers=v_only)
    with pytest.raises(IncompatibleAdapterError, match="both adapted and replaced"):
        build_plan([adapter, replaces], tensors)


def test_a_tensor_replaced_twice_takes_the_last_adapter_s_and_says_so(fixture_root: Path) -> None:
    first = load_adapter(adapter_dir(fixture_root, "gpt2-attn"))
    second = dataclasses.replace(first, replacements={k: v * 2 for k, v in first.replacements.items()})
    plan = build_plan([first, second], _tensors(fixture_root, "gpt2-attn"))
    assert plan.replacements.keys() == first.replacements.keys()
    assert all(plan.replacements[k] is v for k, v in second.replacements.items())
    replaced_again = [w for w in plan.warnings if "replaces" in w and "again" in w]
    assert len(replaced_again) == len(first.replacements)


def test_layers_the_config_targets_without_lambdas_are_left_alone_with_a_warning(fixture_root: Path) -> None:
    adapter = load_adapter(adapter_dir(fixture_root, "llama-qv"))
    fewer = dataclasses.replace(adapter, layers={m: v for m, v in adapter.layers.items() if m != Q0})
    plan = build_plan([fewer], _tensors(fixture_root, "llama-qv"))
    assert f"{Q0}.weight" not in plan.deltas and len(plan.deltas) == len(adapter.layers) - 1
    assert plan.warnings == [
        f"llama-qv: target_modules matches 1 layers without lambdas (left unchanged, as PEFT does): {Q0}"
    ]


def test_the_adapters_own_notes_are_warnings_of_the_plan(fixture_root: Path) -> None:
    adapter = dataclasses.replace(load_adapter(adapter_dir(fixture_root, "llama-qv")), warnings=["a note"])
    assert build_plan([adapter], _tensors(fixture_root, "llama-qv")).warnings == ["llama-qv: a note"]


def test_check_foldable_names_the_weights_that_are_not_floating_point(fixture_root: Path) -> None:
    adapter: VeraAdapter = load_adapter(adapter_dir(fixture_root, "llama-all-noproj"))
    tensors = _meta(_tensors(fixture_root, "llama-all-noproj"))
    plan = build_plan([adapter], tensors)
    plan.check_foldable(tensors)
    quantized = {n: t.to(torch.int8) if n in plan.deltas else t for n, t in tensors.items()}
    with pytest.raises(IncompatibleAdapterError) as caught:
        plan.check_foldable(quantized)
    message = str(caught.value)
    first = next(iter(plan.deltas))
    assert f"{first} (torch.int8)" in message and message.count("torch.int8") == 5 and " ..." in message
    assert "a quantized base cannot be merged" in message


def test_a_quantized_base_is_refused_before_writing(work) -> None:
    tmp_path, base, adapter = work
    tensors = load_file(base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, base / "model.safetensors", {"format": "pt"})
    before = digest(base, adapter)
    assert_clean_failure(
        cli_merge(tmp_path, base, adapter), tmp_path, before, (base, adapter), name, "torch.int8", "quantized"
    )
