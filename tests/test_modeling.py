"""Models by the architecture `config.json` names: the class, the config, tied parameters found without loading
a weight, a model loaded for inference, and the output a verification compares."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors import safe_open

from tests.helpers import load_base
from vera_export.errors import CheckpointError
from vera_export.modeling import (
    checkpoint_renames,
    load_model,
    meta_model,
    model_class,
    model_config,
    model_outputs,
    tied_partners,
)


@pytest.mark.parametrize(
    ("base", "architecture"),
    [
        ("llama", "LlamaForCausalLM"),
        ("gpt2", "GPT2LMHeadModel"),
        ("bert-cls", "BertForSequenceClassification"),
    ],
)
def test_the_class_and_config_are_the_architecture_s(
    fixture_root: Path, base: str, architecture: str
) -> None:
    directory = fixture_root / "bases" / base
    assert model_class(directory) is getattr(transformers, architecture)
    config = model_config(directory)
    assert isinstance(config, model_class(directory).config_class) and config.vocab_size == 256


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (None, "config.json: not found"),
        ("{not json", "config.json: not a readable JSON file"),
        ({"architectures": ["NoSuchForCausalLM"]}, "names no model class this transformers"),
        ({"architectures": []}, "architectures [] names no model class"),
        ({"model_type": "llama"}, "architectures [] names no model class"),
    ],
    ids=["missing", "not JSON", "unknown class", "empty list", "no architectures"],
)
def test_a_config_without_a_known_architecture_is_a_checkpoint_error(
    tmp_path: Path, config: object, fragment: str
) -> None:
    if config is not None:
        (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(CheckpointError) as caught:
        model_class(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'config.json'}: ") and fragment in str(caught.value)


def test_tied_partners_are_found_without_loading_weights(fixture_root: Path) -> None:
    """Against transformers itself: the loaded tied model shares one tensor between embedding and head."""
    tied, untied = fixture_root / "bases" / "llama-tied", fixture_root / "bases" / "llama"
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "not.a.parameter"]
    assert tied_partners(meta_model(tied), names) == {
        "model.embed_tokens.weight": ["lm_head.weight"],
        "lm_head.weight": ["model.embed_tokens.weight"],
    }
    assert tied_partners(meta_model(untied), names) == {}
    model = load_base(tied)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert load_base(untied).lm_head.weight is not load_base(untied).model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_model_loads_for_inference_in_the_dtype_asked(fixture_root: Path, dtype: torch.dtype) -> None:
    model = load_model(fixture_root / "bases" / "llama", dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not model.training and model.config.use_cache is False


def test_loading_leaves_the_callers_progress_bar_setting_as_it_was(fixture_root: Path) -> None:
    logging = transformers.utils.logging
    before = logging.is_progress_bar_enabled()
    try:
        for enabled in (True, False):
            (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
            load_model(fixture_root / "bases" / "gpt2", torch.float32)
            assert logging.is_progress_bar_enabled() is enabled
    finally:
        (logging.enable_progress_bar if before else logging.disable_progress_bar)()


def test_model_outputs_are_logits_or_the_last_hidden_state(fixture_root: Path) -> None:
    model = load_model(fixture_root / "bases" / "llama", torch.float32)
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.int64)}
    with torch.no_grad():
        ((key, logits),) = model_outputs(model, batch).items()
        assert key == "logits" and torch.equal(logits, model(**batch).logits)
        ((key, hidden),) = model_outputs(model.model, batch).items()
        assert key == "last_hidden_state" and hidden.shape == (1, 3, 64)

    def neither(**batch: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(pooler_output=torch.zeros(1))

    with pytest.raises(CheckpointError, match="function returns neither logits nor last_hidden_state"):
        model_outputs(neither, batch)


def test_checkpoint_renames_are_transformers_own_and_leave_converted_keys_out(tmp_path: Path) -> None:
    """Mixtral's router is renamed (block_sparse_moe.gate -> mlp.gate); its experts are fused into one tensor on
    load, no single parameter of the model, and left out."""
    from fixtures.families import build_family

    base, _ = build_family("mixtral", tmp_path / "mixtral")
    keys = list(safe_open(base / "model.safetensors", "pt").keys())
    renames = checkpoint_renames(meta_model(base), keys)
    assert renames["model.layers.0.mlp.gate.weight"] == "model.layers.0.block_sparse_moe.gate.weight"
    assert not any("experts" in key for key in renames.values())
    assert all(key in keys for key in renames.values())
