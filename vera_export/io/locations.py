"""Where a command's inputs are: every base, merged model, adapter and export location is resolved here.

`locate` is the one place that turns what the user passed (`--base`, `--adapter`, `--merged`, `--model`,
`--onnx`) into a local directory, and the one place that says, in one line, what is wrong with it.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

from ..errors import AdapterError, CheckpointError, VeraExportError
from .hub import cache_snapshot, hub_snapshot, is_cache_repository, is_hub_id

ADAPTER_CONFIG_NAME = "adapter_config.json"


class Kind(str, enum.Enum):
    """What a location must hold."""

    BASE = "base"  # a Hugging Face model directory (config.json + safetensors)
    MERGED = "merged"  # the same, written by `merge`
    ADAPTER = "adapter"  # a PEFT VeRA adapter directory
    EXPORT = "export"  # a directory written by `vera-export onnx`


_FLAGS = {Kind.BASE: "--base", Kind.MERGED: "--merged", Kind.ADAPTER: "--adapter", Kind.EXPORT: "--model"}


def locate(location: str | os.PathLike[str], kind: Kind | str, allow_pickle: bool = False) -> Path:
    """The local directory `location` names, checked to be the kind of directory `kind` says.

    Args:
        location: A path to a directory; a Hugging Face Hub ID (`org/name`, `org/name@revision`), fetched into
            the Hub cache or found there (see `hub.hub_snapshot`); or a repository folder of that cache
            (`models--org--name`), which stands for its `refs/main` snapshot.
        kind: What it must hold.
        allow_pickle: Also fetch an adapter's `adapter_model.bin` from the Hub.

    Raises:
        AdapterError: An adapter location that is not an adapter directory.
        CheckpointError: Any other location that is not a directory of its kind.
    """
    kind = Kind(kind)
    path = Path(location)
    error: type[VeraExportError] = AdapterError if kind is Kind.ADAPTER else CheckpointError
    if not path.exists() and is_hub_id(str(location)):
        patterns = _PATTERNS[kind] + (["adapter_model.bin"] if allow_pickle and kind is Kind.ADAPTER else [])
        path = hub_snapshot(str(location), patterns, error)
    elif is_cache_repository(path):
        path = cache_snapshot(path, error)
    if not path.is_dir():
        if kind is Kind.ADAPTER and not path.exists():
            raise error(
                f"{path}: adapter directory does not exist; point --adapter at a PEFT adapter directory "
                f"or a Hub ID (org/name)"
            )
        found = "is a file, not a directory" if path.exists() else "not a directory"
        raise error(f"{path}: {found}; pass a {_WHAT[kind]} directory or a Hub ID to {_FLAGS[kind]}")
    if kind in (Kind.BASE, Kind.MERGED) and (path / ADAPTER_CONFIG_NAME).is_file() and not _has_weights(path):
        raise error(
            f"{path}: is a PEFT adapter ({ADAPTER_CONFIG_NAME}), not a model; pass it to --adapter and the model "
            f"it was trained on to {_FLAGS[kind]}"
        )
    return path


# What each kind needs from a Hub repository: never pickled weights, never the other formats' copies.
_BASE_FILES = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "README.md"]
_PATTERNS = {
    Kind.BASE: _BASE_FILES,
    Kind.MERGED: _BASE_FILES,
    Kind.ADAPTER: [ADAPTER_CONFIG_NAME, "adapter_model.safetensors", "README.md"],
    Kind.EXPORT: ["*"],
}


_WHAT = {
    Kind.BASE: "Hugging Face model",
    Kind.MERGED: "Hugging Face model",
    Kind.ADAPTER: "PEFT adapter",
    Kind.EXPORT: "`vera-export onnx` output",
}


def _has_weights(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
