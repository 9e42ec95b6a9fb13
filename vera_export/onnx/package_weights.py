"""The weights a text-generation package holds, against those it must hold, bit for bit.

Decoding checks that the graph computes what the unmerged model computes, within the precision's roundoff; in
float16 or with int4 weights that roundoff can hide a small error in what was exported (a lambda 1% off). So the
projection weights are checked exactly too: in float graphs they must equal the expected weights in the graph's
dtype (the base's, or in merged mode the 1-ulp fold's, which the builder copies); in int4 graphs their codes and
scales must be ONNX Runtime's own block quantization (`quantize_matmul_4bits`, symmetric, the node's block size,
as the builder quantizes) of the expected float32 weights; and in adapter mode every lambda's default must be the
adapter's, in the graph's dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxruntime.capi._pybind_state import quantize_matmul_4bits

from ..adapter import VeraAdapter
from ..checks import Check
from ..layers import merge_into
from ..modeling import load_model
from .builder_names import slots
from .manifest import Manifest
from .signature import Precision, lambda_input


@torch.no_grad()
def check_weights(
    graph: ir.Model, base, adapters: list[VeraAdapter], manifest: Manifest, precision: Precision
) -> Check:
    """One check over every projection weight of the graph (and every lambda, in adapter mode)."""
    shapes = {name: tuple(shape) for name, (_, shape) in manifest.base_tensors.items()}
    model = load_model(base, torch.float32 if precision.quantized else precision.dtype)
    if manifest.mode == "merged":
        model = merge_into(model, adapters)
    state = model.state_dict()
    values = {value.name: value for node in graph.graph for value in node.outputs}
    problems, compared = [], 0
    for node in graph.graph:
        if node.op_type not in ("MatMul", "MatMulNBits") or node.inputs[1].const_value is None:
            continue
        stem = node.name.removesuffix("/MatMul_Q4").removesuffix("/MatMul")
        found = slots(values, stem, shapes)
        if found is None:
            continue  # a projection of the builder's own (none holds a model weight)
        expected = torch.cat(
            [state[s.parameter][s.rows] for s in found]
        )  # [out, in], the graph's column order
        if node.op_type == "MatMulNBits":
            same = _same_quantization(node, expected)
        else:
            stored = torch.from_numpy(node.inputs[1].const_value.numpy().copy())  # [in, out]
            same = stored.dtype == expected.dtype and torch.equal(stored, expected.T)
        compared += 1
        if not same:
            problems.append(stem)
    del model, state
    if manifest.mode == "adapter":
        (adapter,) = adapters
        initializers = graph.graph.initializers
        for module, layer in adapter.layers.items():
            for kind, values_ in (("b", layer.lambda_b), ("d", layer.lambda_d)):
                name = lambda_input(module, kind)
                stored = torch.from_numpy(initializers[name].const_value.numpy().copy())
                compared += 1
                if not torch.equal(stored, values_.to(precision.dtype)):
                    problems.append(name)
    what = (
        "int4 codes and scales"
        if precision.quantized
        else f"{str(precision.dtype).removeprefix('torch.')} values"
    )
    detail = f"{compared} tensors, {what}" + (f"; differ: {', '.join(problems[:5])}" if problems else "")
    return Check(
        "package weights and lambdas, bit for bit", 0.0, 0.0, 0.0, not problems and compared > 0, detail
    )


def _same_quantization(node: ir.Node, expected: torch.Tensor) -> bool:
    """Whether a `MatMulNBits` node's codes and scales are ONNX Runtime's quantization of `expected` (`[N, K]`)."""
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    n, k, block = attributes["N"], attributes["K"], attributes["block_size"]
    weight = np.ascontiguousarray(expected.float().numpy().T)  # [K, N], as the float MatMul held it
    blocks = (k + block - 1) // block
    packed = np.zeros((n, blocks, block // 2), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, weight, scales, zero_points, block, n, k, True)
    stored_codes = node.inputs[1].const_value.numpy()
    stored_scales = node.inputs[2].const_value.numpy()
    return np.array_equal(stored_codes.reshape(packed.shape), packed) and np.array_equal(
        stored_scales.reshape(scales.shape), scales
    )
