"""Merge, verify and export PEFT VeRA adapters without PEFT.

Every `vera-export` command is a function here with the command's name (`to-lora` is `to_lora`; `onnx` is
`export_onnx`, since `vera_export.onnx` is the ONNX subpackage; `verify --onnx` is `verify_onnx`), taking the
command's inputs and its options dataclass, and returning a report (see `reports`).

Importing this package loads neither torch nor ONNX: every name loads its module on first use.
"""

from __future__ import annotations

import importlib

from .errors import (
    AdapterError,
    CheckpointError,
    IncompatibleAdapterError,
    OutputError,
    SetupError,
    VeraExportError,
    VeraExportWarning,
)
from .options import (
    EmbedOptions,
    InspectOptions,
    MergeOptions,
    OnnxAdapterOptions,
    OnnxOptions,
    Rounding,
    ToLoraOptions,
    UnmergeOptions,
    VerifyOnnxOptions,
    VerifyOptions,
)

# Public name -> the module that defines it.
_LAZY = {
    "VeraAdapter": "adapter",
    "load_adapter": "adapter",
    "VeraConfig": "config",
    "EmbedReport": "embed",
    "embed_projections": "embed",
    "InspectReport": "inspection",
    "inspect": "inspection",
    "VeraLinear": "layers",
    "apply_vera": "layers",
    "merge_into": "layers",
    "unmerge_from": "layers",
    "LoraLayer": "lora",
    "LoraReport": "lora",
    "to_lora": "lora",
    "MergeReport": "merging",
    "merge": "merging",
    "unmerge": "merging",
    "generate_projections": "projections",
    "VerifyReport": "verification",
    "verify": "verification",
    "OnnxReport": "onnx.export",
    "export_onnx": "onnx.export",
    "OnnxAdapterReport": "onnx.adapter_file",
    "onnx_adapter": "onnx.adapter_file",
    "verify_onnx": "onnx.verify",
}

__all__ = [
    "AdapterError",
    "CheckpointError",
    "EmbedOptions",
    "EmbedReport",
    "IncompatibleAdapterError",
    "InspectOptions",
    "InspectReport",
    "LoraLayer",
    "LoraReport",
    "MergeOptions",
    "MergeReport",
    "OnnxAdapterOptions",
    "OnnxAdapterReport",
    "OnnxOptions",
    "OnnxReport",
    "OutputError",
    "Rounding",
    "SetupError",
    "ToLoraOptions",
    "UnmergeOptions",
    "VeraAdapter",
    "VeraConfig",
    "VeraExportError",
    "VeraExportWarning",
    "VeraLinear",
    "VerifyOnnxOptions",
    "VerifyOptions",
    "VerifyReport",
    "apply_vera",
    "embed_projections",
    "export_onnx",
    "generate_projections",
    "inspect",
    "load_adapter",
    "merge",
    "merge_into",
    "onnx_adapter",
    "to_lora",
    "unmerge",
    "unmerge_from",
    "verify",
    "verify_onnx",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
