"""The unmerged forward of `apply_vera` is PEFT's, and in-memory merge / unmerge keep the 1-ulp rule."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import (
    ALL_ADAPTERS,
    UNTYING_ADAPTERS,
    adapter_dir,
    base_dir,
    load_base,
    load_peft,
    outputs,
    sample_inputs,
)
from vera_export import apply_vera, merge_into, unmerge_from
from vera_export.layers import VeraLinear


@pytest.mark.parametrize("name", ALL_ADAPTERS)
def test_unmerged_forward_equals_peft(fixture_root, name: str) -> None:
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    peft_model = load_peft(base, [adapter])
    ours = apply_vera(load_base(base), [adapter])
    inputs = sample_inputs(ours.config.vocab_size)
    assert any(isinstance(m, VeraLinear) for m in ours.modules())
    # Same operations in the same order: bit-identical, in every dtype.
    torch.testing.assert_close(outputs(ours, inputs), outputs(peft_model, inputs), rtol=0, atol=0)
    # And the adapter matters: the base model alone differs.
    assert not torch.allclose(outputs(load_base(base), inputs), outputs(ours, inputs))


def test_two_adapters_forward_equals_peft(fixture_root) -> None:
    names = ["llama-qv", "llama-qkv-b"]
    base = base_dir(fixture_root, names[0])
    adapters = [adapter_dir(fixture_root, n) for n in names]
    peft_model = load_peft(base, adapters)
    ours = apply_vera(load_base(base), adapters)
    inputs = sample_inputs(ours.config.vocab_size)
    torch.testing.assert_close(outputs(ours, inputs), outputs(peft_model, inputs), rtol=0, atol=0)
    single = apply_vera(load_base(base), adapters[:1])
    assert not torch.allclose(outputs(single, inputs), outputs(ours, inputs))


@pytest.mark.parametrize("name", ALL_ADAPTERS)
def test_merge_into_matches_unmerged_forward(fixture_root, name: str) -> None:
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    unmerged = apply_vera(load_base(base), [adapter])
    merged = merge_into(load_base(base), [adapter])
    inputs = sample_inputs(merged.config.vocab_size)
    expected, actual = outputs(unmerged, inputs), outputs(merged, inputs)
    dtype = next(merged.parameters()).dtype
    # Merging rounds each weight once, in the model's dtype; outputs move by a few roundoffs of that dtype.
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", ["llama-qv", "gpt2-attn", "llama-bf16-all"])
def test_unmerge_from_restores_the_base(fixture_root, name: str) -> None:
    from vera_export.precision import ulp

    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    original = load_base(base)
    model = merge_into(load_base(base), [adapter])
    merged_state = {k: v.clone() for k, v in model.state_dict().items()}
    unmerge_from(model, [adapter])
    changed = 0
    for key, before in original.state_dict().items():
        after = model.state_dict()[key]
        if "bias" in key and not torch.equal(after, before):
            continue  # trained biases were replaced by the merge; unmerge cannot bring them back
        bound = (
            ulp(merged_state[key], before.dtype) + ulp(before, before.dtype)
            if before.is_floating_point()
            else 0
        )
        assert ((after.double() - before.double()).abs() <= bound).all(), key
        changed += not torch.equal(merged_state[key], before)
    assert changed > 0


def test_stored_projections_stay_as_stored_on_a_16_bit_base(fixture_root) -> None:
    """PEFT rounds regenerated projections to a 16-bit base's dtype but keeps stored float32 ones as they are."""
    base = fixture_root / "bases" / "llama-bf16-sharded"  # the same weights as llama-qv's base, in bf16
    adapter = adapter_dir(fixture_root, "llama-qv")
    peft_model = load_peft(base, [adapter])
    ours = apply_vera(load_base(base), [adapter])
    inputs = sample_inputs(ours.config.vocab_size)
    torch.testing.assert_close(outputs(ours, inputs), outputs(peft_model, inputs), rtol=0, atol=0)
    stored = peft_model.base_model.vera_A["a0"]
    assert not torch.equal(stored, stored.bfloat16().float())  # really not rounded, so the test can tell


@pytest.mark.parametrize("name", UNTYING_ADAPTERS)
def test_merge_into_unties_what_the_adapter_changes_and_saves_both(fixture_root, tmp_path, name: str) -> None:
    """A tied head's delta is the head's alone (as in PEFT's forward, not its merge_and_unload); the config says
    so, so that save_pretrained stores both tensors and from_pretrained does not tie them again."""
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    merged = merge_into(load_base(base), [adapter])
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path / "out")
    inputs = sample_inputs(merged.config.vocab_size)
    expected = outputs(load_peft(base, [adapter]), inputs)
    torch.testing.assert_close(outputs(load_base(tmp_path / "out"), inputs), expected, rtol=1e-5, atol=1e-5)
