"""Which modules an adapter targets, against PEFT's own check over a grid of configs, and how each resolves
against a base's tensors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings
from pathlib import Path

import pytest

from vera_export.adapter import VeraAdapter, load_adapter
from vera_export.config import VeraConfig
from vera_export.errors import IncompatibleAdapterError
from vera_export.io.index import ShardedTensorIndex
from vera_export.targets import (
    incompatibilities,
    is_targeted,
    linear_weights,
    match_layers,
    module_names,
    projection_dims,
    untrained_targets,
)

MODULES = [
    *(f"model.layers.{i}.{path}" for i in (0, 1, 10) for path in ("self_attn.q_proj", "mlp.up_proj")),
    "model.layers.1.mlp.experts.0.up_proj",
    "transformer.h.1.attn.c_attn",
    "lm_head",
    "q_proj",
    "model.blocks.1.q_proj",
]
TARGETS = [["q_proj"], ["q_proj", "up_proj"], r".*\.q_proj", ["model.layers.10.self_attn.q_proj"], ["c_attn"]]
LAYERS = [None, [1], 1, [0, 10]]
PATTERNS = [None, "layers", ["layers", "h"], "", [], ["blocks"]]


@pytest.mark.parametrize(
    ("target_modules", "layers_to_transform", "layers_pattern"), itertools.product(TARGETS, LAYERS, PATTERNS)
)
def test_targeted_modules_are_peft_s(tmp_path, target_modules, layers_to_transform, layers_pattern) -> None:
    from peft import VeraConfig as PeftVeraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_config = PeftVeraConfig(
                r=4,
                target_modules=target_modules,
                layers_to_transform=layers_to_transform,
                layers_pattern=layers_pattern,
            )
    except ValueError:
        pytest.skip("PEFT refuses this combination")
    raw = {**peft_config.to_dict(), "peft_type": "VERA"}
    if isinstance(raw["target_modules"], (set, list)):
        raw["target_modules"] = sorted(raw["target_modules"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw, default=list))
    ours = VeraConfig.from_json(tmp_path / "adapter_config.json")
    for module in MODULES:
        assert is_targeted(ours, module) == bool(check_target_module_exists(peft_config, module)), module


def _adapter(fixture_root: Path, name: str) -> VeraAdapter:
    return load_adapter(fixture_root / "adapters" / name)


def _shapes(fixture_root: Path, name: str) -> dict[str, tuple[int, ...]]:
    from fixtures.build import ADAPTERS

    index = ShardedTensorIndex.from_dir(fixture_root / "bases" / ADAPTERS[name].base)
    return {n: info.shape for n, info in index.tensors.items()}


def test_linear_weights_and_module_names_come_from_the_tensor_names() -> None:
    shapes = {"a.b.weight": (4, 3), "a.b.bias": (4,), "a.norm.weight": (3,), "head.weight": (2, 3)}
    assert linear_weights(shapes) == {"a.b": (4, 3), "head": (2, 3)}
    assert module_names(shapes) == ["a", "a.b", "a.norm", "head"]


@pytest.mark.parametrize(("name", "fan_in_fan_out"), [("llama-qv", False), ("gpt2-attn", True)])
def test_layers_resolve_to_their_stored_layout(fixture_root: Path, name: str, fan_in_fan_out: bool) -> None:
    adapter, shapes = _adapter(fixture_root, name), _shapes(fixture_root, name)
    layers = match_layers(adapter, shapes)
    assert list(layers) == list(adapter.layers)
    for module, layer in layers.items():
        assert layer.weight == f"{module}.weight" and layer.shape == shapes[layer.weight]
        assert layer.fan_in_fan_out is fan_in_fan_out
        assert layer.out_features == adapter.layers[module].lambda_b.numel()
        rows, cols = layer.shape
        assert (layer.in_features, layer.out_features) == ((rows, cols) if fan_in_fan_out else (cols, rows))


def test_every_misfit_with_another_base_is_listed_at_once(fixture_root: Path) -> None:
    adapter = _adapter(fixture_root, "llama-qv")
    problems = incompatibilities(adapter, _shapes(fixture_root, "gpt2-attn"))
    assert len(problems) == len(adapter.layers) and all(
        "has no 2-D weight in the base" in p for p in problems
    )
    with pytest.raises(
        IncompatibleAdapterError, match=f"does not fit the base model \\({len(problems)} problems\\)"
    ):
        match_layers(adapter, _shapes(fixture_root, "gpt2-attn"))
    assert incompatibilities(adapter, _shapes(fixture_root, "llama-qv")) == []


def test_untrained_targets_and_projection_dims(fixture_root: Path) -> None:
    """The shapes of regenerated projections come from every layer PEFT would target, trained or not."""
    adapter = _adapter(fixture_root, "llama-all-noproj")
    shapes = _shapes(fixture_root, "llama-all-noproj")
    assert untrained_targets(adapter, shapes) == []
    assert projection_dims(adapter, shapes) == (96, 96)  # down_proj's in, gate/up_proj's out
    fewer = dataclasses.replace(adapter, layers={m: v for m, v in adapter.layers.items() if "mlp" not in m})
    assert untrained_targets(fewer, shapes) == [m for m in adapter.layers if "mlp" in m]
    assert projection_dims(fewer, shapes) == (96, 96)  # the untrained mlp layers still size the projections
    with pytest.raises(IncompatibleAdapterError, match="matches no linear layer of the base"):
        projection_dims(adapter, {"model.norm.weight": (64,)})
