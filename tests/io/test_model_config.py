"""`read_model_config`: a base's config.json checked the way transformers would refuse it, and fuzzed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vera_export.errors import CheckpointError
from vera_export.io.model_config import read_model_config


def _write(tmp_path: Path, value: object) -> Path:
    (tmp_path / "config.json").write_text(value if isinstance(value, str) else json.dumps(value))
    return tmp_path


def test_a_real_config_reads_back(fixture_root) -> None:
    from tests.helpers import base_dir

    raw = read_model_config(base_dir(fixture_root, "llama-qv"))
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["hidden_size"] == 64


def test_no_config_is_none(tmp_path: Path) -> None:
    assert read_model_config(tmp_path) is None


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("[1]", "is a JSON list, expected an object"),
        ("{nope", "not a readable JSON file"),
        (b"\xff\xfe".decode("latin-1"), "not a readable JSON file"),
        ({"architectures": "LlamaForCausalLM"}, "'architectures'"),
        ({"architectures": [123]}, "'architectures'"),
        ({"hidden_size": "sixty-four"}, "'hidden_size' is 'sixty-four', expected a positive integer"),
        ({"num_hidden_layers": -2}, "'num_hidden_layers'"),
        ({"vocab_size": True}, "'vocab_size'"),
        ({"rms_norm_eps": "small"}, "'rms_norm_eps'"),
        ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings'"),
        ({"rope_scaling": [1, 2]}, "'rope_scaling'"),
        ({"eos_token_id": [2, "three"]}, "'eos_token_id'"),
        ({"model_type": 7}, "'model_type'"),
    ],
)
def test_what_transformers_would_refuse_is_refused_naming_the_field(
    tmp_path: Path, value, fragment: str
) -> None:
    with pytest.raises(CheckpointError) as caught:
        read_model_config(_write(tmp_path, value))
    assert str(caught.value).startswith(f"{tmp_path / 'config.json'}: ") and fragment in str(caught.value)


def test_a_huge_value_is_quoted_short(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as caught:
        read_model_config(_write(tmp_path, {"hidden_size": "x" * 1_000_000}))
    assert len(str(caught.value)) < 1000


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_FIELDS = [
    "architectures",
    "hidden_size",
    "vocab_size",
    "rope_scaling",
    "eos_token_id",
    "tie_word_embeddings",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), _JSON, max_size=6) | _JSON)
def test_fuzzed_configs_end_in_our_error_or_a_dict(tmp_path: Path, value) -> None:
    try:
        raw = read_model_config(_write(tmp_path, value))
    except CheckpointError as exc:
        assert str(exc).startswith(str(tmp_path)) and len(str(exc)) < 3000
    else:
        assert isinstance(raw, dict)
