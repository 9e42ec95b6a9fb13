"""From a PyTorch module to a saved ONNX graph: tracing, the passes that keep VeRA's tensors intact, optimizing.

The exporter's own optimizer is not used: it merges initializers with equal values (two lambda vectors, or a
lambda of ones and a norm's weight) and folds the slices of `vera_A` / `vera_B` into per-layer copies. The graph
is traced unoptimized, the trained tensors become graph inputs, and only then does the onnxscript optimizer run,
with folding turned off for anything that reads the projections (ONNX Runtime folds those slices in memory when it
creates a session). Merged graphs go through the same optimizer, so the modes differ only by the adapter's path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnx.checker import check_model
from torch import nn

from ..errors import CheckpointError, OutputError
from ..io.index import ShardedTensorIndex
from .signature import ADAPTER_INDEX, ADAPTERS_AXIS, VERA_A, VERA_B, Signature

MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
# The node that fails when an adapter index is out of range: ONNX Runtime names it in its error.
INDEX_GUARD = "adapter_index_out_of_range"
# Protobuf cannot serialize 2 GiB; leave room for the graph itself.
_INLINE_LIMIT = 2**31 - 2**28


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Silence the named loggers and all warnings: the exporter and the optimizer report on their own internals,
    and none of it is for our users."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@torch.no_grad()
def trace(module: nn.Module, signature: Signature, opset: int, name: str) -> ir.Model:
    """The unoptimized graph of `module`, inputs and outputs named as `signature` says, every axis dynamic.

    Args:
        module: Takes the signature's inputs by name and returns its output.
        signature: The graph's interface.
        opset: The ONNX opset.
        name: The model's class name, for the error message.

    Raises:
        CheckpointError: The exporter cannot trace the model.
    """
    with quiet("torch.onnx"):
        try:
            program = torch.onnx.export(
                module.eval(),
                signature.examples(),
                dynamo=True,
                optimize=False,
                opset_version=opset,
                input_names=signature.input_names,
                output_names=list(signature.outputs),
                dynamic_shapes=signature.dynamic_shapes(),
                verbose=False,
            )
        except torch.onnx.OnnxExporterError as exc:
            reason = (str(exc.__cause__ or exc).strip().splitlines() or ["no reason given"])[0]
            raise CheckpointError(
                f"torch.onnx cannot export {name} ({reason}); --debug shows the exporter's traceback, and the "
                f"README's Limits say which models are known to export"
            ) from exc
    return program.model


def name_projections(graph: ir.Model, vera_A: torch.Tensor, vera_B: torch.Tensor) -> set[ir.Value]:
    """Rename the exporter's constants holding the shared projections to `vera.vera_A` / `vera.vera_B`."""
    initializers = graph.graph.initializers
    shared = set()
    for name, tensor in ((VERA_A, vera_A), (VERA_B, vera_B)):
        expected = tensor.numpy()
        found = [
            v
            for v in initializers.values()
            if tuple(v.shape) == expected.shape and np.array_equal(v.const_value.numpy(), expected)
        ]
        if len(found) != 1:
            raise RuntimeError(
                f"expected the exported graph to hold {name} once, found it {len(found)} times"
            )
        found[0].name = name  # onnx_ir re-keys graph.initializers
        shared.add(found[0])
    return shared


def expose_trained_tensors(graph: ir.Model, module: nn.Module, names: dict[int, str]) -> dict[str, dict]:
    """Turn the initializers of trained tensors into graph inputs with defaults; return their specs by name.

    Args:
        graph: The traced graph.
        module: The module it was traced from; the exporter names initializers after its parameter paths.
        names: Graph input name by id of each trained tensor of `module`.

    Tensors the graph does not use (a head that the task drops, or a layer only it feeds) are removed first and
    get no input.
    """
    ir.passes.common.RemoveUnusedNodesPass()(graph)
    initializers = graph.graph.initializers
    members = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    exposed = {}
    for path, tensor in members:
        name = names.get(id(tensor))
        value = initializers.get(path)
        if name is None or value is None or name in exposed:
            continue
        value.name = name
        graph.graph.inputs.append(value)
        exposed[name] = {"shape": list(value.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    return dict(sorted(exposed.items()))


def declare_adapters_axis(graph: ir.Model, overridable: dict[str, dict]) -> None:
    """Declare the tables' leading axis symbolic, so adapter files may hold banks of any size."""
    for name, spec in overridable.items():
        value = graph.graph.initializers[name]
        value.shape = ir.Shape([ADAPTERS_AXIS, *value.shape[1:]])
        spec["shape"] = [ADAPTERS_AXIS, *spec["shape"][1:]]


def guard_adapter_index(graph: ir.Model, table: str) -> None:
    """Route every use of `adapter_index` through a node that fails unless each index is in `[0, n)`.

    ONNX Runtime's CPU `Gather` refuses indices of n or more, but takes -n to -1 as counting from the end, and
    other execution providers need not check at all. So the graph counts the indices outside `[0, n)` (n read from
    the `table` input, as fed) and reshapes `adapter_index` to `[batch + that count]`: a no-op when the count is 0,
    and an error on every runtime otherwise, raised by the node named `INDEX_GUARD`.
    """
    index = next(v for v in graph.graph.inputs if v.name == ADAPTER_INDEX)
    table_value = graph.graph.initializers[table]
    checked = ir.Value(name=f"{ADAPTER_INDEX}_checked", shape=index.shape, type=index.type)
    index.replace_all_uses_with(checked)
    tape = ir.tape.Tape()
    zero = tape.op("Constant", [], {"value": ir.tensor(np.array(0, dtype=np.int64))})
    count = tape.op("Shape", [table_value], {"start": 0, "end": 1})
    inside = tape.op("And", [tape.op("GreaterOrEqual", [index, zero]), tape.op("Less", [index, count])])
    outside = tape.op("Cast", [tape.op("Not", [inside])], {"to": ir.DataType.INT64})
    outside = tape.op("ReduceSum", [outside], {"keepdims": 1})
    shape = tape.op("Add", [tape.op("Shape", [index]), outside])
    tape.op("Reshape", [index, shape], name=INDEX_GUARD, output=checked)
    graph.graph.insert_before(graph.graph.node(0), tape.nodes)


def optimize(graph: ir.Model, shared: set[ir.Value]) -> None:
    """Constant folding and clean-up, never folding a node that reads the shared projections.

    No operator fusions: at opset 23 onnxscript's fuse their RotaryEmbedding nodes that ONNX Runtime 1.32 rejects
    for inputs of other shapes than the export's example; at opset 18 they find nothing to fuse.
    """
    with quiet("onnx_ir", "onnxscript"):
        onnxscript.optimizer.optimize_ir(
            graph, should_fold=lambda node: False if shared & set(node.inputs) else None
        )
    _forget_last_match()
    # Source locations of every node: most of the file, of no use to a runtime.
    ir.passes.common.ClearMetadataAndDocStringPass()(graph)


def _forget_last_match() -> None:
    """onnxscript's default rewrite rules are module-level objects whose matchers keep the last node (and graph)
    they matched: through it the whole graph, every weight and the traced model stay in memory after the optimizer
    returns, while verification loads the model twice more. Clear that state (and `tests/onnx/test_graph.py`
    checks that the weights are freed, should onnxscript rename it)."""
    from onnxscript import rewriter

    for rule in getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()):
        matcher = getattr(rule, "_matcher", None)
        for attribute in ("_current_node", "_graph", "_match"):
            if hasattr(matcher, attribute):
                setattr(matcher, attribute, None)


def needs_external_data(index: ShardedTensorIndex, dtype: torch.dtype, external_data: bool | None) -> bool:
    """Whether the graph's weights go to `model.onnx.data`: as asked, or when they pass protobuf's 2 GiB.

    Raises:
        OutputError: Inline weights were asked for and do not fit.
    """
    weights = dtype.itemsize * sum(math.prod(info.shape) for info in index.tensors.values())
    if external_data is None:
        return weights > _INLINE_LIMIT
    if not external_data and weights > _INLINE_LIMIT:
        raise OutputError(
            f"the graph's {str(dtype).removeprefix('torch.')} weights are {weights / 2**30:.1f} GiB, more than one "
            f"ONNX file can hold (2 GiB); allow external data"
        )
    return external_data


def save(graph: ir.Model, directory: Path, external_data: bool) -> None:
    """Write `DIRECTORY/model.onnx` (and `model.onnx.data`), then check it with `onnx.checker` in full."""
    path = directory / MODEL_NAME
    ir.save(graph, path, external_data=DATA_NAME if external_data else None)
    check_model(str(path), full_check=True)  # a path, so graphs over 2 GiB are checked too
