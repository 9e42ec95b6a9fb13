"""Which modules an adapter targets, against PEFT's own check over a grid of configs."""

from __future__ import annotations

import itertools
import json
import warnings

import pytest

from vera_export.config import VeraConfig
from vera_export.targets import is_targeted

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
