"""The weights an int4 graph really computes with: its `MatMulNBits` weights dequantized, under the model's names.

Verifying an int4 package against a float model would measure the quantization, not the export. So the reference
is the model with the graph's own dequantized weights (and the VeRA branch unmerged), and stays as tight as for
float graphs; the int4 error against the float model is reported beside it.

`com.microsoft::MatMulNBits` (4 bits) stores `B` as uint8 `[N, K / block_size, block_size / 2]`, two values per
byte, the low nibble first, with one scale per block `[N, K / block_size]` and, when its fourth input is absent, the
zero point 8: `W[n, k] = (q[n, k] - 8) * scale[n, k // block_size]`, the weight of `Y = X @ W.T` in `nn.Linear`'s
`[out, in]` layout. The builder names a quantized projection after its module (`/model/layers.0/attn/qkv_proj/
MatMul_Q4`, see `builder_names`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import torch

from ..errors import CheckpointError
from .builder_names import slots

# The input embedding, as the model and as the builder's nodes name it.
EMBEDDING, EMBEDDING_NODES = "model.embed_tokens.weight", "/model/embed_tokens/"


def dequantize(node: ir.Node) -> torch.Tensor:
    """The float32 `[N, K]` weight of one 4-bit `MatMulNBits` node."""
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    if attributes.get("bits", 4) != 4:
        raise CheckpointError(f"{node.name}: a {attributes['bits']}-bit MatMulNBits; only 4 bits are read")
    k, n, block = attributes["K"], attributes["N"], attributes["block_size"]
    packed = node.inputs[1].const_value.numpy()
    scales = node.inputs[2].const_value.numpy().astype(np.float32).reshape(n, -1)
    zero = None
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        zero = _nibbles(node.inputs[3].const_value.numpy().reshape(n, -1))[:, : scales.shape[1]]
    values = _nibbles(packed.reshape(n, -1)).astype(np.float32)
    points = np.float32(8) if zero is None else np.repeat(zero.astype(np.float32), block, axis=1)
    weight = (values - points) * np.repeat(scales, block, axis=1)
    return torch.from_numpy(np.ascontiguousarray(weight[:, :k]))


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Unpack uint8 `[rows, m]` into `[rows, 2 m]` 4-bit values, low nibble first."""
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(packed.shape[0], -1)


def dequantized_weights(graph: ir.Graph, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Every quantized weight of a builder graph, dequantized, by the model's parameter name (`[out, in]`).

    A projection the builder packed is split into its members' weights, and members of a module the checkpoint
    stores packed are put back together (see `builder_names.slots`).

    Raises:
        CheckpointError: A quantized node whose module the naming does not lead to, or a weight of the base only
            partly quantized.
    """
    values = {value.name: value for node in graph for value in node.outputs}
    weights: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    by_scales: dict[ir.Value, str] = {}
    for node in graph:
        if node.op_type != "MatMulNBits":
            continue
        stem = node.name.removesuffix("/MatMul_Q4")
        found = slots(values, stem, shapes)
        if found is None:
            raise CheckpointError(f"{stem}: a quantized projection whose module this tool cannot name")
        if len(found) == 1:
            by_scales[node.inputs[2]] = found[0].parameter
        weight = dequantize(node)
        for slot in found:
            shape = tuple(shapes[slot.parameter])
            target = weights.setdefault(slot.parameter, torch.full(shape, float("nan")))
            part = target[slot.rows]
            part.copy_(weight[slot.columns])
            filled[slot.parameter] = filled.get(slot.parameter, 0) + part.numel()
    partial = [name for name, weight in weights.items() if filled[name] != weight.numel()]
    if partial:
        raise CheckpointError(
            f"{', '.join(partial[:3])}: only partly found in the graph's quantized projections"
        )
    # A tied model's graph reads its input embedding from the head's codes and scales (GatherBlockQuantized): the
    # embedding is the head's dequantized weight there.
    for node in graph:
        if node.op_type == "GatherBlockQuantized" and node.name.startswith(EMBEDDING_NODES):
            head = by_scales.get(node.inputs[2])
            if head is not None and tuple(shapes.get(EMBEDDING, ())) == tuple(weights[head].shape):
                weights[EMBEDDING] = weights[head]
    return weights
