"""ONNX export: everything that imports onnx, onnx_ir, onnxscript or onnxruntime lives in this package.

- `signature`: what a graph takes and returns (inputs with example values and dynamic axes, outputs, dtype);
- `modes`: the export modes (merged, adapter, bank), what differs between them as one class each;
- `bank`: the PyTorch modules of a bank (one adapter per batch row);
- `graph`: tracing, the graph passes, optimizing and saving;
- `export`: the `onnx` command; `verify`: `verify --onnx`; `runtime`: ONNX Runtime sessions;
- `manifest`: `vera_export.json`; `adapter_file`: the `onnx-adapter` command.

The libraries take seconds to import, so the names below load on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "OnnxReport": "export",
    "export_onnx": "export",
    "OnnxAdapterReport": "adapter_file",
    "onnx_adapter": "adapter_file",
    "verify_onnx": "verify",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
