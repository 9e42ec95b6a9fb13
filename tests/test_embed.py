"""Embedding regenerated projections: PEFT loads the copy bit-identically to the original, from the stored tensors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import adapter_dir, base_dir, load_peft, outputs, sample_inputs
from vera_export import AdapterError, EmbedOptions, Rounding
from vera_export.embed import embed_projections

WEIGHTS = "adapter_model.safetensors"


@pytest.mark.parametrize(
    "name", ["llama-all-noproj", "llama-layers", "llama-bf16-all", "gpt2-attn", "bert-cls"]
)
def test_embedded_adapter_loads_bit_identically_in_peft(fixture_root, tmp_path, name: str) -> None:
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    out = tmp_path / "embedded"
    report = embed_projections(base, adapter, out)

    original, embedded = load_file(adapter / WEIGHTS), load_file(out / WEIGHTS)
    assert embedded.keys() == original.keys() | {"base_model.vera_A", "base_model.vera_B"}
    for key, value in original.items():
        assert torch.equal(embedded[key], value), key
    config, original_config = (json.loads((d / "adapter_config.json").read_text()) for d in (out, adapter))
    assert config == {**original_config, "save_projection": True}
    assert report.vera_A_shape == tuple(embedded["base_model.vera_A"].shape)

    reference = load_peft(base, [adapter])
    # The embedded projections are the ones PEFT draws (and rounds to a 16-bit base) for the original.
    assert torch.equal(embedded["base_model.vera_A"], reference.base_model.vera_A["a0"])
    assert torch.equal(embedded["base_model.vera_B"], reference.base_model.vera_B["a0"])
    # PEFT must use the stored tensors, not redraw them: another key would draw other projections.
    config["projection_prng_key"] = original_config.get("projection_prng_key", 0) + 1
    (out / "adapter_config.json").write_text(json.dumps(config))
    inputs = sample_inputs(reference.config.vocab_size)
    torch.testing.assert_close(
        outputs(load_peft(base, [out]), inputs), outputs(reference, inputs), rtol=0, atol=0
    )


def test_other_rounding_embeds_other_projections(fixture_root, tmp_path) -> None:
    """`options.rounding` decides the draw; on this machine (FMA) only the default reproduces PEFT."""
    name = "llama-all-noproj"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    embed_projections(base, adapter, tmp_path / "fma")
    embed_projections(base, adapter, tmp_path / "separate", EmbedOptions(rounding=Rounding.SEPARATE))
    fma, separate = load_file(tmp_path / "fma" / WEIGHTS), load_file(tmp_path / "separate" / WEIGHTS)
    # vera_B (96, 16): its bound sqrt(6 / 16) is no power of two, so the two roundings of x * span + low differ.
    a, b = fma["base_model.vera_B"], separate["base_model.vera_B"]
    assert 0.1 < (a != b).float().mean() < 0.9
    assert (
        (a - b).abs() <= torch.finfo(torch.float32).eps * a.abs().max()
    ).all()  # one rounding of x * span apart


def test_adapter_with_stored_projections_is_refused(fixture_root, tmp_path) -> None:
    name = "llama-qv"
    with pytest.raises(AdapterError, match="already stores base_model.vera_A"):
        embed_projections(base_dir(fixture_root, name), adapter_dir(fixture_root, name), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_files_of_the_adapter_are_copied(fixture_root, tmp_path) -> None:
    name = "gpt2-attn"
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir(fixture_root, name), adapter)
    (adapter / "README.md").write_text("model card\n")
    (adapter / "extra").mkdir()
    (adapter / "extra" / "notes.txt").write_text("notes\n")
    embed_projections(base_dir(fixture_root, name), adapter, tmp_path / "out")
    assert (tmp_path / "out" / "README.md").read_text() == "model card\n"
    assert (tmp_path / "out" / "extra" / "notes.txt").read_text() == "notes\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in adapter.iterdir())
