"""`inspect` says where projections come from and whether the key reproduces stored ones."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import adapter_dir, base_dir
from vera_export import InspectOptions, Rounding, generate_projections, inspect


@pytest.mark.parametrize(
    "name, expected",
    [
        ("llama-qv", "fma rounding"),
        ("llama-fp16-qv", "fma rounding, rounded to float16 as on a 16-bit model"),
    ],
)
def test_stored_projections_are_matched_to_their_key(fixture_root, name: str, expected: str) -> None:
    report = inspect(adapter_dir(fixture_root, name))
    assert report.projections.source == "stored"
    assert report.projections.regenerated_as == expected


def test_projections_from_an_old_cpu_and_tampered_ones(fixture_root, tmp_path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir(fixture_root, "llama-qv"), adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    r, max_in = tensors["base_model.vera_A"].shape
    vera_A, vera_B = generate_projections(
        0, r, max_in, tensors["base_model.vera_B"].shape[0], Rounding.SEPARATE
    )
    save_file(
        {**tensors, "base_model.vera_A": vera_A, "base_model.vera_B": vera_B},
        adapter / "adapter_model.safetensors",
    )
    assert inspect(adapter).projections.regenerated_as == "separate rounding"

    save_file({**tensors, "base_model.vera_A": vera_A * 1.5}, adapter / "adapter_model.safetensors")
    report = inspect(adapter)
    assert report.projections.regenerated_equal is False and "keep them stored" in report.text()


def test_regenerated_projection_shapes_with_base(fixture_root) -> None:
    name = "llama-all-noproj"
    report = inspect(adapter_dir(fixture_root, name), base=base_dir(fixture_root, name))
    assert report.compatible and report.projections.source == "regenerated"
    # all-linear on hidden 64 / intermediate 96: max_in = 96 (down_proj), max_out = 96 (gate/up_proj).
    assert report.projections.vera_A == [16, 96] and report.projections.vera_B == [96, 16]
    assert all(layer.weight_shape is not None for layer in report.layers)


def test_size_of_a_pickled_adapter_and_a_saved_base_weight_merge_would_refuse(fixture_root, tmp_path) -> None:
    import torch

    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dir(fixture_root, "llama-qv"), pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    report = inspect(pickled, options=InspectOptions(allow_pickle=True))
    assert report.checkpoint_bytes == (pickled / "adapter_model.bin").stat().st_size > 0

    # An adapted layer's base weight saved beside its lambdas (as PEFT saves lm_head.base_layer.weight): fine when
    # it is the base's, a problem merge would refuse when it is not.
    both = tmp_path / "both"
    shutil.copytree(adapter_dir(fixture_root, "llama-qv"), both)
    tensors = load_file(both / "adapter_model.safetensors")
    base = base_dir(fixture_root, "llama-qv")
    name = "model.layers.0.self_attn.q_proj"
    weight = load_file(base / "model.safetensors")[f"{name}.weight"]
    tensors[f"base_model.model.{name}.base_layer.weight"] = weight
    save_file(tensors, both / "adapter_model.safetensors")
    assert inspect(both, base=base).compatible
    tensors[f"base_model.model.{name}.base_layer.weight"] = weight + 1
    save_file(tensors, both / "adapter_model.safetensors")
    report = inspect(both, base=base)
    assert not report.compatible and any("trained on another base model" in p for p in report.problems)
