"""int4 weights read back: `dequantize` against ONNX Runtime's own MatMulNBits, and the model's names."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from tests.onnx.helpers import Packages
from vera_export.errors import CheckpointError
from vera_export.onnx.manifest import Manifest
from vera_export.onnx.quantized import dequantize, dequantized_weights

K, N = 96, 40  # K not a multiple of... it is: 3 blocks of 32; N odd-sized on purpose


def _quantized(weight: np.ndarray, symmetric: bool, level: int = 1):
    """A one-node MatMul of `weight` ([K, N]) quantized by ONNX Runtime's quantizer."""
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/mm/MatMul")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=symmetric, accuracy_level=level)
    quantizer.process()
    return quantizer.model.model


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero points"])
def test_dequantized_weight_is_what_onnx_runtime_computes_with(symmetric: bool) -> None:
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    x = rng.standard_normal((5, K)).astype(np.float32)
    model = _quantized(weight, symmetric)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    node = next(n for n in ir.from_proto(model).graph if n.op_type == "MatMulNBits")
    dequantized = dequantize(node).double().numpy()  # [N, K]
    reference = x.astype(np.float64) @ dequantized.T
    # Accuracy level 1: ONNX Runtime dequantizes and multiplies in float32, within a few roundoffs of float64.
    assert np.abs(y - reference).max() <= 16 * 2**-24 * np.abs(reference).max()
    # And dequantizing is not the identity: the int4 weight differs from the float one by up to half a step.
    assert 0 < np.abs(dequantized - weight.T).max() < np.abs(weight).max() / 7


def test_package_weights_come_back_under_the_models_names(packages: Packages) -> None:
    """Llama's packed q/k/v split back into q_proj, k_proj and v_proj; Phi-3's split gate/up put back into its
    gate_up_proj; every weight of the base's shape; lm_head too."""
    for key in (("llama-gen-all", "adapter", "int4"), ("phi3-packed", "merged", "int4")):
        package = packages[key]
        manifest = Manifest.read(package.directory)
        shapes = {name: tuple(shape) for name, (_, shape) in manifest.base_tensors.items()}
        graph = ir.load(package.directory / "model.onnx").graph
        weights = dequantized_weights(graph, shapes)
        linear = {n for n, s in shapes.items() if n.endswith("proj.weight") or n == "lm_head.weight"}
        assert set(weights) == linear
        assert all(tuple(w.shape) == shapes[n] and torch.isfinite(w).all() for n, w in weights.items())


def test_a_projection_without_a_module_is_refused() -> None:
    rng = np.random.default_rng(1)
    model = ir.from_proto(_quantized((rng.standard_normal((K, N)) * 0.05).astype(np.float32), True))
    with pytest.raises(CheckpointError, match="/mm"):
        dequantized_weights(model.graph, {"mm.weight": (N, K)})
