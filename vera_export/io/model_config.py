"""A model directory's `config.json`, checked before anything is written: outputs are promised to load with
`from_pretrained`, and a config that transformers cannot read breaks that promise.

Read without transformers (which takes seconds to import): JSON, an object, and the fields every architecture
shares of the types transformers requires. Fields this table does not know are left to transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, quoted

CONFIG_NAME = "config.json"
_POSITIVE_INTS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "num_labels",
)
_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "initializer_range")
_BOOLS = ("tie_word_embeddings", "use_cache", "is_encoder_decoder")
_OBJECTS = ("rope_scaling", "rope_parameters", "quantization_config", "id2label", "label2id")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_STRINGS = ("model_type", "hidden_act", "torch_dtype", "dtype")


def read_model_config(model_dir: Path) -> dict[str, Any] | None:
    """The checked `config.json` of a model directory, or None when it has none.

    Raises:
        CheckpointError: The file cannot be read, is not a JSON object, or a field has a type transformers would
            refuse; naming the file and the field.
    """
    path = model_dir / CONFIG_NAME
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable JSON file ({reason}); a Hugging Face model needs a valid config.json"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: is a JSON {type(raw).__name__}, expected an object")
    problems = _problems(raw)
    if problems:
        raise CheckpointError(
            f"{path}: {'; '.join(problems[:5])}; fix config.json (transformers would refuse it)"
        )
    return raw


def _problems(raw: dict[str, Any]) -> list[str]:
    problems = []

    def field(name: str, expected: str) -> None:
        problems.append(f"field {quoted(name)} is {quoted(raw[name])}, expected {expected}")

    architectures = raw.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) and a for a in architectures)
    ):
        field("architectures", "a list of class names")
    for name in _POSITIVE_INTS:
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            field(name, "a positive integer")
    for name in _NUMBERS:
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            field(name, "a number")
    for name in _BOOLS:
        if name in raw and not isinstance(raw[name], bool):
            field(name, "true or false")
    for name in _OBJECTS:
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            field(name, "an object or null")
    for name in _TOKEN_IDS:
        value = raw.get(name)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            field(name, "a token id, a list of them, or null")
    for name in _STRINGS:
        if raw.get(name) is not None and not isinstance(raw[name], str):
            field(name, "a string")
    return problems
