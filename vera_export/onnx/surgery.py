"""VeRA branches added to a decoder graph written by the ONNX Runtime GenAI model builder.

For every adapted module, the output `y = W x` of its projection (found by the builder's naming, see
`builder_names`) becomes

    y + lambda_b * ((lambda_d * (x @ A_s^T)) @ B_s^T)

with `x` the projection's own input; `A_s^T` / `B_s^T` sliced and transposed from the shared `vera.vera_A` /
`vera.vera_B` (stored once) once per distinct size; `x @ A_s^T` computed once per input and shared by the modules
that read it (q, k and v); and the lambdas overridable graph inputs named as in adapter mode, the adapter's values
their defaults. Where the builder packs modules into one projection, each module's branch is padded to its
columns, so any subset of q, k and v may be adapted; where it splits a packed module (Phi-3's `gate_up_proj`),
the branch is sliced to each part. The branch computes in the graph's floating point dtype, whatever the base
weights' storage (float32 next to int4 weights), and is added after the builder's quantization.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import torch

from ..adapter import VeraAdapter
from ..errors import CheckpointError
from ..targets import TargetLayer
from .builder_names import Piece, pieces, width
from .signature import VERA_A, VERA_B, lambda_input


def find_pieces(
    graph: ir.Graph, layers: Mapping[str, TargetLayer], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, list[Piece]]:
    """Where each adapted module's output is in `graph`.

    Raises:
        CheckpointError: A module whose projection the builder's naming does not lead to, named.
    """
    values = {value.name: value for node in graph for value in node.outputs}
    found = {module: pieces(values, module, target.out_features, shapes) for module, target in layers.items()}
    missing = [module for module, where in found.items() if where is None]
    if missing:
        raise CheckpointError(
            f"the model builder's graph has no projection for {', '.join(missing[:5])}; the VeRA branch cannot be "
            f"added to this architecture's graph (export it with --mode merged)"
        )
    return found


def add_branches(
    graph: ir.Graph,
    adapter: VeraAdapter,
    layers: Mapping[str, TargetLayer],
    shapes: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
) -> dict[str, dict]:
    """Add the adapter's branch to every adapted module of a builder graph, in place.

    Args:
        graph: The builder's decoder graph.
        adapter: The adapter, its projections pinned (its lambdas become the inputs' defaults).
        layers: Its layers in the base (`targets.match_layers`).
        shapes: The base checkpoint's tensor shapes.
        dtype: The graph's floating point dtype (of its activations), which the branch computes in.

    Returns:
        The overridable inputs added, name -> {"shape", "dtype"}, as the manifest records them.
    """
    found = find_pieces(graph, layers, shapes)
    nodes = _Nodes(graph, dtype, adapter.vera_A, adapter.vera_B)
    deltas: dict[ir.Value, list[ir.Value]] = {}
    for module, where in found.items():
        target, layer = layers[module], adapter.layers[module]
        x = where[0].output.producer().inputs[0]  # every piece's projection reads the module's input
        delta = nodes.branch(
            module, nodes.down(x, target.in_features), layer.lambda_b, layer.lambda_d, target
        )
        for k, piece in enumerate(where):
            part = (
                delta if len(where) == 1 else nodes.columns(f"{module}/{k}", delta, piece.start, piece.width)
            )
            rest = width(piece.output) - piece.offset - piece.width
            if piece.offset or rest:
                part = nodes.pad(module, part, piece.offset, rest)
            deltas.setdefault(piece.output, []).append(part)
    for output, parts in deltas.items():
        nodes.add_to(output, parts)
    graph.sort()  # the nodes were appended: ONNX wants them in topological order
    return dict(sorted(nodes.overridable.items()))


class _Nodes:
    """Makes the branch's nodes and initializers, named after the modules they serve."""

    def __init__(
        self, graph: ir.Graph, dtype: torch.dtype, vera_A: torch.Tensor, vera_B: torch.Tensor
    ) -> None:
        self.graph, self.dtype = graph, dtype
        self.overridable: dict[str, dict] = {}
        self._sliced: dict[tuple[str, int], ir.Value] = {}
        self._down: dict[tuple[str, int], ir.Value] = {}
        self._names: set[str] = set()
        self._shared = {
            VERA_A: self._initializer(VERA_A, vera_A.to(dtype).numpy()),
            VERA_B: self._initializer(VERA_B, vera_B.to(dtype).numpy()),
        }

    def _initializer(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(
            name=name,
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            shape=ir.Shape(array.shape),
            const_value=ir.tensor(array, name=name),
        )
        self.graph.register_initializer(value)
        return value

    def _ints(self, name: str, values: list[int]) -> ir.Value:
        return self._initializer(name, np.array(values, np.int64))

    def _node(self, op: str, inputs: list[ir.Value], name: str, **attributes) -> ir.Value:
        while name in self._names:  # value names must be unique
            name += "_"
        self._names.add(name)
        node = ir.node(op, inputs, attributes=attributes or None, name=name, num_outputs=1)
        node.outputs[0].name = f"{name}/output_0"
        self.graph.append(node)
        return node.outputs[0]

    def _projection(self, which: str, size: int) -> ir.Value:
        """`vera_A[:, :size].T` (`[size, r]`) or `vera_B[:size].T` (`[r, size]`), made once per size and shared:
        ONNX Runtime folds them into constants when it loads the graph."""
        key = (which, size)
        if key not in self._sliced:
            stem = f"/vera/{which.removeprefix('vera.')}_{size}"
            axis = 1 if which == VERA_A else 0
            bounds = [
                self._ints(f"{stem}/{part}", [v])
                for part, v in (("starts", 0), ("ends", size), ("axes", axis))
            ]
            sliced = self._node("Slice", [self._shared[which], *bounds], f"{stem}/Slice")
            self._sliced[key] = self._node("Transpose", [sliced], f"{stem}/Transpose", perm=[1, 0])
        return self._sliced[key]

    def down(self, x: ir.Value, in_features: int) -> ir.Value:
        """`x @ A_s^T`, once per input value."""
        key = (x.name, in_features)
        if key not in self._down:
            stem = x.name.removesuffix("/output_0")
            self._down[key] = self._node(
                "MatMul", [x, self._projection(VERA_A, in_features)], f"{stem}/vera/MatMul_A"
            )
        return self._down[key]

    def _lambda(self, name: str, values: torch.Tensor) -> ir.Value:
        value = self._initializer(name, values.to(self.dtype).numpy())
        self.graph.inputs.append(value)  # an initializer that is also an input: overridable
        self.overridable[name] = {
            "shape": list(values.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        return value

    def branch(
        self, module: str, h: ir.Value, lambda_b: torch.Tensor, lambda_d: torch.Tensor, target: TargetLayer
    ) -> ir.Value:
        """`lambda_b * ((lambda_d * h) @ B_s^T)` for one module."""
        stem = "/" + module.replace(".", "/") + "/vera"
        scaled = self._node("Mul", [h, self._lambda(lambda_input(module, "d"), lambda_d)], f"{stem}/Mul_d")
        up = self._node("MatMul", [scaled, self._projection(VERA_B, target.out_features)], f"{stem}/MatMul_B")
        return self._node("Mul", [up, self._lambda(lambda_input(module, "b"), lambda_b)], f"{stem}/Mul_b")

    def columns(self, name: str, delta: ir.Value, start: int, width: int) -> ir.Value:
        """Columns `start` to `start + width` of `delta`'s last axis."""
        stem = "/" + name.replace(".", "/") + "/vera"
        bounds = [
            self._ints(f"{stem}/{part}", [v]) for part, v in (("starts", start), ("ends", start + width))
        ]
        return self._node("Slice", [delta, *bounds, self._ints(f"{stem}/axes", [-1])], f"{stem}/Slice")

    def pad(self, module: str, delta: ir.Value, before: int, after: int) -> ir.Value:
        """`delta` zero-padded on its last axis to its columns of a packed projection's output."""
        stem = "/" + module.replace(".", "/") + "/vera"
        pads = self._ints(f"{stem}/pads", [0, 0, before, 0, 0, after])
        return self._node("Pad", [delta, pads], f"{stem}/Pad")

    def add_to(self, output: ir.Value, deltas: list[ir.Value]) -> None:
        """Every reader of `output` reads `output + sum(deltas)` instead; a graph output (the head's `logits`)
        becomes the sum, under the same name."""
        uses = list(output.uses())
        graph_output = output in self.graph.outputs
        if graph_output:
            # The name the builder gives a projection's output, int4 (`MatMul_Q4`) or not: `.../MatMul/output_0`.
            name, output.name = output.name, f"{output.producer().name.removesuffix('_Q4')}/output_0"
        stem = output.name.removesuffix("/output_0") + "/vera"
        total = deltas[0]
        for k, delta in enumerate(deltas[1:]):
            total = self._node("Add", [total, delta], f"{stem}/Sum_{k}")
        summed = self._node("Add", [output, total], f"{stem}/Add")
        for use in uses:
            use.node.replace_input_with(use.idx, summed)
        if graph_output:
            self.graph.outputs[self.graph.outputs.index(output)] = summed
            summed.name, summed.type, summed.shape = name, output.type, output.shape
