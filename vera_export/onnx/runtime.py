"""ONNX Runtime, as the verification and the tests run exported graphs."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors

from .graph import MODEL_NAME

# Everything ONNX Runtime raises for a graph it cannot load or run (one class per status code): a failed check.
ORT_ERRORS = tuple(v for v in vars(ort_errors).values() if isinstance(v, type) and issubclass(v, Exception))


def session(onnx_dir: str | Path, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of `ONNX_DIR/model.onnx`, without the per-default-input warnings."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns once per overridable input that it is also an initializer
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(Path(onnx_dir) / MODEL_NAME), options, providers=["CPUExecutionProvider"])


def first_line(exc: Exception) -> str:
    """What ONNX Runtime said, as one line."""
    return f"ONNX Runtime failed: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
