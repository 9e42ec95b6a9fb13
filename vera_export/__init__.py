"""Merge, verify and export PEFT VeRA adapters without PEFT."""

from .adapter import VeraAdapter, VeraConfig, load_adapter
from .embed import EmbedReport, embed_projections
from .errors import (
    AdapterError,
    CheckpointError,
    IncompatibleAdapterError,
    OutputError,
    VeraExportError,
    VeraExportWarning,
)
from .inspection import inspect
from .layers import VeraLinear, apply_vera, merge_into, unmerge_from
from .lora import LoraLayer, LoraReport, to_lora
from .merging import merge, unmerge
from .options import MergeOptions, OnnxOptions
from .projections import Rounding, generate_projections
from .verification import verify

__all__ = [
    "AdapterError",
    "CheckpointError",
    "EmbedReport",
    "IncompatibleAdapterError",
    "LoraLayer",
    "LoraReport",
    "MergeOptions",
    "OnnxAdapterReport",
    "OnnxOptions",
    "OnnxReport",
    "OutputError",
    "Rounding",
    "VeraAdapter",
    "VeraConfig",
    "VeraExportError",
    "VeraExportWarning",
    "VeraLinear",
    "apply_vera",
    "embed_projections",
    "generate_projections",
    "inspect",
    "load_adapter",
    "merge",
    "merge_into",
    "onnx",
    "onnx_adapter",
    "to_lora",
    "unmerge",
    "unmerge_from",
    "verify",
    "verify_onnx",
]

# ONNX's libraries take seconds to import; they load on first use of these names.
_LAZY = {
    "OnnxAdapterReport": "ort_adapter",
    "onnx_adapter": "ort_adapter",
    "OnnxReport": "onnx_export",
    "onnx": "onnx_export",
    "verify_onnx": "onnx_export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
