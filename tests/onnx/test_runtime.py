"""ONNX Runtime sessions as the verification runs them, and the errors it raises caught as one kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from vera_export.onnx.graph import MODEL_NAME
from vera_export.onnx.runtime import ORT_ERRORS, first_line, session


def _save_graph(directory: Path) -> Path:
    """A graph that doubles a float vector, saved as `DIRECTORY/model.onnx`."""
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n"])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(directory / MODEL_NAME)
    )
    return directory


def test_a_session_runs_the_directory_s_graph_on_the_cpu(tmp_path: Path) -> None:
    runner = session(_save_graph(tmp_path), threads=1)
    assert runner.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_array_equal(
        runner.run(None, {"x": np.array([1.5, -2.0], dtype=np.float32)})[0], [3.0, -4.0]
    )


def test_everything_onnx_runtime_raises_is_one_of_ort_errors(tmp_path: Path) -> None:
    with pytest.raises(ORT_ERRORS):
        session(tmp_path)  # no model.onnx
    (tmp_path / MODEL_NAME).write_bytes(b"not a graph")
    with pytest.raises(ORT_ERRORS):
        session(tmp_path)
    runner = session(_save_graph(tmp_path))
    with pytest.raises(ORT_ERRORS) as caught:
        runner.run(None, {"x": np.array([1, 2], dtype=np.int64)})  # the wrong type
    assert first_line(caught.value).startswith("ONNX Runtime failed: ")


def test_first_line_is_one_line_or_the_error_s_type() -> None:
    assert first_line(RuntimeError("  [ONNXRuntimeError] : 2 : INVALID_ARGUMENT\nstack\n")) == (
        "ONNX Runtime failed: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT"
    )
    assert first_line(RuntimeError()) == "ONNX Runtime failed: RuntimeError"
