"""Export a base model with VeRA adapters to ONNX: merged, with the adapter as swappable graph inputs, or as a bank.

All modes load the base in float32 and export it with torch.onnx's dynamo exporter; the graph takes `input_ids`
and `attention_mask` (int64, `[batch, sequence]`, both axes dynamic) and returns `logits` or `last_hidden_state`.

- **merged**: the adapters are folded into the float32 weights by `layers.merge_into` (correctly rounded), and the
  graph is the plain model.
- **adapter**: each adapted layer is `layers.VeraLinear`, so the graph computes
  `W x + lambda_b * (B_s (lambda_d * (A_s x)))` with `A_s` / `B_s` sliced in the graph from the shared
  `vera.vera_A` / `vera.vera_B`, stored once. Every tensor the adapter trains is an overridable graph input with
  the adapter's values as default (names in `ort_adapter`), so the graph runs as the exported adapter with only
  `input_ids` and `attention_mask` fed, and as another one with an ONNX Runtime adapter file.
- **bank**: the layers are `bank.VeraBankLinear` (and trained tensors `bank.RowSelected*`), holding the lambdas and
  trained tensors of all the adapters as tables `[n, ...]`; a third input, `adapter_index` (int64 `[batch]`), says
  which adapter each batch row runs. The tables are overridable inputs like adapter mode's, their leading axis
  declared symbolic, and a guard in front of the graph's first use of `adapter_index` makes ONNX Runtime fail on an
  index outside `[0, n)` (`_guard_adapter_index`).

The exporter's own optimizer is not used: it merges initializers with equal values (two lambda vectors, or a
lambda of ones and a norm's weight) and folds the slices of `vera_A` / `vera_B` into per-layer copies. The graph
is exported unoptimized, the trained tensors become graph inputs, and only then does the onnxscript optimizer run,
with folding turned off for anything that reads the projections (ONNX Runtime folds those slices in memory when it
creates a session). Merged graphs go through the same optimizer, so the two modes differ only by the adapter's path.

Projections are resolved against the base checkpoint as `merge` resolves them (regenerated ones rounded to a
16-bit base's dtype, as PEFT does), so the graph of a 16-bit base computes in float32 the function that PEFT's
16-bit model computes in 16-bit arithmetic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors
import onnxscript.optimizer
import torch
from onnx.checker import check_model
from torch import nn

from .adapter import VeraAdapter, load_adapter
from .bank import Bank, RowSelection, apply_bank, build_bank
from .errors import AdapterError, CheckpointError, OutputError
from .layers import VeraLinear, apply_vera, merge_into, untie
from .merging import copy_side_files
from .modeling import load_model, model_class
from .options import TASKS, OnnxOptions
from .ort_adapter import (
    ADAPTERS_AXIS,
    MANIFEST_NAME,
    VERA_A,
    VERA_B,
    Manifest,
    lambda_input,
    projection_digest,
    projection_fingerprint,
    stack_inputs,
    tensor_input,
)
from .outputs import staged_output
from .plan import Plan, build_plan, pin_projections
from .progress import stage_bar
from .projections import Rounding
from .safetensors_io import ShardedTensorIndex
from .verification import Check, VerifyReport, cast_adapter, model_inputs

# Everything ONNX Runtime raises for a graph it cannot load or run (one class per status code): a failed check.
_ORT_ERRORS = tuple(v for v in vars(ort_errors).values() if isinstance(v, type) and issubclass(v, Exception))

INPUT_NAMES = ("input_ids", "attention_mask")
ADAPTER_INDEX = "adapter_index"
# The node that fails when an adapter index is out of range: ONNX Runtime names it in its error.
INDEX_GUARD = "adapter_index_out_of_range"
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
# Neither axis of the example is 1, which the exporter would specialize instead of keeping dynamic.
_EXAMPLE_SHAPE = (2, 8)
_EXPORT_STAGES = ("loading", "tracing", "optimizing", "writing")
# Protobuf cannot serialize 2 GiB; leave room for the graph itself.
_INLINE_LIMIT = 2**31 - 2**28
# Verification: ONNX Runtime's float32 graph may be off the float64 reference by this many times PyTorch's own
# float32 forward of the unmerged model, plus this many float32 roundoffs of the largest output.
PRECISION_FACTOR = 4.0
FLOOR_ROUNDOFFS = 16.0


@dataclass
class OnnxReport:
    """What an export wrote, and its verification when it ran."""

    output: Path
    mode: str
    task: str
    adapters: list[str]
    files: list[str] = field(default_factory=list)
    overridable: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    verification: VerifyReport | None = None

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "mode": self.mode,
            "task": self.task,
            "adapters": self.adapters,
            "files": self.files,
            "overridable": self.overridable,
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
            "verify": None if self.verification is None else self.verification.to_json(),
        }


def resolve_task(base: Path, task: str) -> str:
    """The task to export: `task` itself, checked against the architecture, or the one `"auto"` picks.

    Raises:
        CheckpointError: The architecture does not do `task`, or `"auto"` cannot tell.
    """
    architecture = model_class(base).__name__
    if task == "auto":
        found = next((name for name, (_, suffixes) in TASKS.items() if architecture.endswith(suffixes)), None)
        if found is None:
            raise CheckpointError(
                f"{base}: cannot tell the task of {architecture}; pass --task ({', '.join(TASKS)})"
            )
        return found
    if task != "feature-extraction" and not architecture.endswith(TASKS[task][1]):
        raise CheckpointError(
            f"{base}: {architecture} is not a {task} model; pass --task auto or --task feature-extraction"
        )
    return task


class GraphOutput(nn.Module):
    """`forward(input_ids, attention_mask)` -> the task's output tensor: what the graph computes."""

    input_names = INPUT_NAMES

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.output = TASKS[task][0]
        self.body = model.base_model if self.output == "last_hidden_state" else model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.body(input_ids=input_ids, attention_mask=attention_mask), self.output)


class BankGraphOutput(GraphOutput):
    """`forward(input_ids, attention_mask, adapter_index)` -> the task's output, row i run by adapter_index[i]."""

    input_names = (*INPUT_NAMES, ADAPTER_INDEX)

    def __init__(self, model: nn.Module, task: str, selection: RowSelection) -> None:
        super().__init__(model, task)
        self.selection = selection

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter_index: torch.Tensor
    ) -> torch.Tensor:
        with self.selection.rows(adapter_index):
            return super().forward(input_ids, attention_mask)


def onnx(
    base: str | Path,
    adapters: Sequence[str | Path | VeraAdapter],
    output: str | Path,
    options: OnnxOptions = OnnxOptions(),
) -> OnnxReport:
    """Export the base model with VeRA adapters to `OUTPUT/model.onnx`, then verify it (unless told not to).

    Writes `model.onnx` (and `model.onnx.data` with external data), `vera_export.json` (see
    `ort_adapter.Manifest`) and the base's config and tokenizer files.

    Args:
        base: Hugging Face model directory (config.json and safetensors weights).
        adapters: PEFT VeRA adapter directories or loaded adapters; exactly one in adapter mode; in bank mode
            row k of the bank is `adapters[k]`.
        output: Directory to create; written in full or not at all.
        options: See `OnnxOptions`.

    Returns:
        The report; `report.verification.passed` is the verdict when verification ran.

    Raises:
        AdapterError, IncompatibleAdapterError, CheckpointError, OutputError: Before anything is written.
    """
    started = time.perf_counter()
    base, output = Path(base), Path(output)
    index = ShardedTensorIndex.from_dir(base)
    loaded, plan = _resolve(index, adapters, options.allow_pickle, options.rounding, options.mode)
    task = resolve_task(base, options.task)
    external_data = _external_data(index, options.external_data)
    report = OnnxReport(
        output, options.mode, task, [str(a.path) for a in loaded], warnings=list(plan.warnings)
    )
    stages = [*_EXPORT_STAGES, *(["verifying"] if options.verify else [])]
    with stage_bar(stages, f"exporting ({options.mode})", options.progress) as start:
        with staged_output(output, [base, *(a.path for a in loaded)], options.force) as staging:
            graph, manifest = _export(base, index, loaded, plan, task, options, start)
            start("writing")
            _save(graph, staging, external_data)
            del graph  # its weights, before verification loads the model twice more
            manifest.write(staging)
            report.warnings.extend(copy_side_files(base, staging, index.shards))
            report.files = sorted(p.name for p in staging.iterdir())
            report.overridable = len(manifest.overridable)
        if options.verify:
            start("verifying")
            report.verification = verify_onnx(output, base, loaded, allow_pickle=options.allow_pickle)
    report.seconds = time.perf_counter() - started
    return report


def _resolve(
    index: ShardedTensorIndex,
    adapters: Sequence[str | Path | VeraAdapter],
    allow_pickle: bool,
    rounding: Rounding,
    mode: str,
) -> tuple[list[VeraAdapter], Plan | Bank]:
    """Load the adapters and pin their projections as resolved against the checkpoint's stored dtypes.

    Returns the plan of their stacking (merged and adapter mode) or, in bank mode, the bank they form.
    """
    loaded = [load_adapter(a, allow_pickle) for a in adapters]
    if mode == "adapter" and len(loaded) != 1:
        raise AdapterError(
            f"adapter mode exports exactly one adapter, got {len(loaded)}; export the others as adapter files "
            f"(vera-export onnx-adapter), serve them all from one graph with --mode bank, or fold them all with "
            f"--mode merged"
        )
    if mode == "bank":
        bank = build_bank(loaded, index.tensors, rounding)
        return bank.adapters, bank
    plan = build_plan(loaded, index.tensors, rounding)
    # Stored projections from here on: the float32 model loaded for export must not regenerate them unrounded.
    return pin_projections(loaded, plan), plan


def _export(
    base: Path,
    index: ShardedTensorIndex,
    adapters: list[VeraAdapter],
    plan: Plan | Bank,
    task: str,
    options: OnnxOptions,
    start: Callable[[str], None],
) -> tuple[ir.Model, Manifest]:
    """The optimized graph, and the manifest that describes it; calls `start` with each of `_EXPORT_STAGES[:3]`."""
    manifest = Manifest(
        mode=options.mode,
        task=task,
        output=TASKS[task][0],
        opset=options.opset,
        adapters=[str(a.path) for a in adapters],
        rounding=options.rounding.value,
        base_tensors={
            name: (str(info.dtype).removeprefix("torch."), list(info.shape))
            for name, info in index.tensors.items()
        },
    )
    start("loading")
    model = load_model(base, torch.float32)
    start("tracing")
    if options.mode == "merged":
        graph, shared = _trace(GraphOutput(merge_into(model, adapters), task), options.opset), set()
    elif options.mode == "adapter":
        graph, shared = _adapter_graph(model, adapters[0], plan, task, options.opset, manifest)
    else:
        graph, shared = _bank_graph(model, plan, task, options.opset, manifest)
    del model
    start("optimizing")
    _optimize(graph, shared)
    if options.mode == "bank":
        _declare_adapters_axis(graph, manifest)
        _guard_adapter_index(graph, manifest)
    return graph, manifest


def _adapter_graph(
    model: nn.Module, adapter: VeraAdapter, plan: Plan, task: str, opset: int, manifest: Manifest
) -> tuple[ir.Model, set[ir.Value]]:
    """The graph with `VeraLinear` layers and the adapter's tensors as inputs; records them in `manifest`."""
    projections = plan.projections[str(adapter.path)]
    names = _trained_tensors(model, adapter)
    wrapper = GraphOutput(model, task)
    graph = _trace(wrapper, opset)
    shared = _name_projections(graph, projections.vera_A, projections.vera_B)
    manifest.overridable = _expose_trained_tensors(graph, wrapper, names)
    manifest.projections = projection_fingerprint(adapter, projections)
    manifest.layers = list(adapter.layers)
    manifest.replaced = list(adapter.replacements)
    return graph, shared


def _bank_graph(
    model: nn.Module, bank: Bank, task: str, opset: int, manifest: Manifest
) -> tuple[ir.Model, set[ir.Value]]:
    """The graph with bank layers and the tables as inputs; records them in `manifest`."""
    shapes = {lambda_input(m, "b"): (t.out_features,) for m, t in bank.layers.items()}
    shapes |= {lambda_input(m, "d"): (bank.adapters[0].config.r,) for m in bank.layers}
    state = model.state_dict()
    shapes |= {tensor_input(name): tuple(state[name].shape) for name in bank.replaced}
    tables = {
        name: nn.Parameter(table, requires_grad=False)
        for name, table in stack_inputs(bank.adapters, shapes, torch.float32).items()
    }
    wrapper = BankGraphOutput(model, task, apply_bank(model, bank, tables))
    graph = _trace(wrapper, opset)
    shared = _name_projections(graph, bank.projections.vera_A, bank.projections.vera_B)
    manifest.overridable = _expose_trained_tensors(
        graph, wrapper, {id(t): name for name, t in tables.items()}
    )
    manifest.projections = projection_fingerprint(bank.adapters[0], bank.projections)
    manifest.layers = list(bank.layers)
    manifest.replaced = list(bank.replaced)
    return graph, shared


def _trained_tensors(model: nn.Module, adapter: VeraAdapter) -> dict[int, str]:
    """Wrap the adapted layers with `VeraLinear`; return graph input names by id of the tensors the adapter trains."""
    untie(
        model, adapter.replacements
    )  # first: the inputs must be the trained copies, not a tied partner's weights
    state = model.state_dict(keep_vars=True)
    names = {id(state[name]): tensor_input(name) for name in adapter.replacements}
    apply_vera(model, [adapter])
    for module, layer in model.named_modules():
        if isinstance(layer, VeraLinear):
            names[id(layer.lambda_b[0])] = lambda_input(module, "b")
            names[id(layer.lambda_d[0])] = lambda_input(module, "d")
    return names


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    # The exporter and the optimizer log and warn about their own internals; none of it is for our users.
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
def _trace(wrapper: GraphOutput | BankGraphOutput, opset: int) -> ir.Model:
    """The unoptimized graph of `wrapper`, inputs and output named, batch and sequence axes dynamic."""
    example = torch.ones(_EXAMPLE_SHAPE, dtype=torch.int64)
    examples = (example, example.clone(), torch.zeros(_EXAMPLE_SHAPE[:1], dtype=torch.int64))
    tokens = {0: "batch", 1: "sequence"}
    axes = {"input_ids": tokens, "attention_mask": tokens, ADAPTER_INDEX: {0: "batch"}}
    names = list(wrapper.input_names)
    with _quiet("torch.onnx"):
        try:
            program = torch.onnx.export(
                wrapper.eval(),
                examples[: len(names)],
                dynamo=True,
                optimize=False,
                opset_version=opset,
                input_names=names,
                output_names=[wrapper.output],
                dynamic_shapes={name: axes[name] for name in names},
                verbose=False,
            )
        except torch.onnx.OnnxExporterError as exc:
            reason = (str(exc.__cause__ or exc).strip().splitlines() or ["no reason given"])[0]
            raise CheckpointError(
                f"torch.onnx cannot export {type(wrapper.body).__name__} ({reason}); --debug shows the exporter's "
                f"traceback, and the README's Limits say which models are known to export"
            ) from exc
    return program.model


def _name_projections(graph: ir.Model, vera_A: torch.Tensor, vera_B: torch.Tensor) -> set[ir.Value]:
    """Rename the exporter's constants holding the shared projections to `vera.vera_A` / `vera.vera_B`."""
    initializers = graph.graph.initializers
    shared = set()
    for name, tensor in ((VERA_A, vera_A), (VERA_B, vera_B)):
        expected = tensor.to(torch.float32).numpy()
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


def _expose_trained_tensors(graph: ir.Model, wrapper: nn.Module, names: dict[int, str]) -> dict[str, dict]:
    """Turn the initializers of trained tensors into graph inputs with defaults; return their specs by name.

    The exporter names initializers after the wrapper's parameter paths. Tensors the graph does not use (a head
    that the task drops, or a layer only it feeds) are removed first and get no input.
    """
    ir.passes.common.RemoveUnusedNodesPass()(graph)
    initializers = graph.graph.initializers
    members = [
        *wrapper.named_parameters(remove_duplicate=False),
        *wrapper.named_buffers(remove_duplicate=False),
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


def _declare_adapters_axis(graph: ir.Model, manifest: Manifest) -> None:
    """Declare the tables' leading axis symbolic, so adapter files may hold banks of any size."""
    for name, spec in manifest.overridable.items():
        value = graph.graph.initializers[name]
        value.shape = ir.Shape([ADAPTERS_AXIS, *value.shape[1:]])
        spec["shape"] = [ADAPTERS_AXIS, *spec["shape"][1:]]


def _guard_adapter_index(graph: ir.Model, manifest: Manifest) -> None:
    """Route every use of `adapter_index` through a node that fails unless each index is in `[0, n)`.

    ONNX Runtime's CPU `Gather` refuses indices of n or more, but takes -n to -1 as counting from the end, and
    other execution providers need not check at all. So the graph counts the indices outside `[0, n)` (n read from
    the first table, as fed) and reshapes `adapter_index` to `[batch + that count]`: a no-op when the count is 0,
    and an error on every runtime otherwise, raised by the node named `INDEX_GUARD`.
    """
    index = next(v for v in graph.graph.inputs if v.name == ADAPTER_INDEX)
    table = graph.graph.initializers[next(iter(manifest.overridable))]
    checked = ir.Value(name=f"{ADAPTER_INDEX}_checked", shape=index.shape, type=index.type)
    index.replace_all_uses_with(checked)
    tape = ir.tape.Tape()
    zero = tape.op("Constant", [], {"value": ir.tensor(np.array(0, dtype=np.int64))})
    count = tape.op("Shape", [table], {"start": 0, "end": 1})
    inside = tape.op("And", [tape.op("GreaterOrEqual", [index, zero]), tape.op("Less", [index, count])])
    outside = tape.op("Cast", [tape.op("Not", [inside])], {"to": ir.DataType.INT64})
    outside = tape.op("ReduceSum", [outside], {"keepdims": 1})
    shape = tape.op("Add", [tape.op("Shape", [index]), outside])
    tape.op("Reshape", [index, shape], name=INDEX_GUARD, output=checked)
    graph.graph.insert_before(graph.graph.node(0), tape.nodes)


def _optimize(graph: ir.Model, shared: set[ir.Value]) -> None:
    """Constant folding and clean-up, never folding a node that reads the shared projections.

    No operator fusions: at opset 23 onnxscript's fuse their RotaryEmbedding nodes that ONNX Runtime 1.32 rejects
    for inputs of other shapes than the export's example; at opset 18 they find nothing to fuse.
    """
    with _quiet("onnx_ir", "onnxscript"):
        onnxscript.optimizer.optimize_ir(
            graph, should_fold=lambda node: False if shared & set(node.inputs) else None
        )
    # Source locations of every node: most of the file, of no use to a runtime.
    ir.passes.common.ClearMetadataAndDocStringPass()(graph)


def _external_data(index: ShardedTensorIndex, external_data: bool | None) -> bool:
    """Whether the graph's weights go to `model.onnx.data`: as asked, or when float32 weights pass 2 GiB."""
    weights = 4 * sum(math.prod(info.shape) for info in index.tensors.values())
    if external_data is None:
        return weights > _INLINE_LIMIT
    if not external_data and weights > _INLINE_LIMIT:
        raise OutputError(
            f"the graph's float32 weights are {weights / 2**30:.1f} GiB, more than one ONNX file can hold (2 GiB); "
            f"allow external data"
        )
    return external_data


def _save(graph: ir.Model, directory: Path, external_data: bool) -> None:
    path = directory / MODEL_NAME
    ir.save(graph, path, external_data=DATA_NAME if external_data else None)
    check_model(str(path), full_check=True)  # a path, so graphs over 2 GiB are checked too


def session(onnx_dir: str | Path, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of `ONNX_DIR/model.onnx`, without the per-default-input warnings."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns once per overridable input that it is also an initializer
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(Path(onnx_dir) / MODEL_NAME), options, providers=["CPUExecutionProvider"])


def verify_onnx(
    onnx_dir: str | Path,
    base: str | Path,
    adapters: Sequence[str | Path | VeraAdapter],
    allow_pickle: bool = False,
) -> VerifyReport:
    """Compare an exported graph, run in ONNX Runtime, with the unmerged VeRA model in PyTorch.

    Checks the graph's inputs, output and overridable inputs against `vera_export.json`, then its output on
    `verify.model_inputs` (two shapes, one row left-padded) against the base model with `VeraLinear` layers
    computed in float64. Positions masked out by `attention_mask` are not compared: their values mean nothing and
    the exported graph masks fully masked rows differently from eager PyTorch. The tolerance is
    `PRECISION_FACTOR` times PyTorch's own float32 error on the same inputs plus `FLOOR_ROUNDOFFS` float32
    roundoffs of the largest output.

    A bank runs on `bank_inputs` instead, every row against the unmerged model of its own adapter alone.

    Args:
        onnx_dir: Directory written by `onnx`.
        base: The base model directory.
        adapters: The adapters exported, in order (in adapter mode, the one whose values are the defaults; in bank
            mode, row k of the default tables is `adapters[k]`).
        allow_pickle: Read `adapter_model.bin` when there is no safetensors file.

    Returns:
        The report; `report.passed` is the verdict.
    """
    onnx_dir, base = Path(onnx_dir), Path(base)
    manifest = Manifest.read(onnx_dir)
    index = ShardedTensorIndex.from_dir(base)
    loaded, plan = _resolve(index, adapters, allow_pickle, Rounding(manifest.rounding), manifest.mode)
    if manifest.mode == "bank" and len(loaded) != len(manifest.adapters):
        raise AdapterError(
            f"{onnx_dir}: the bank holds {len(manifest.adapters)} adapters and {len(loaded)} were given; pass "
            f"every adapter it was exported with, in order, so that each row is checked"
        )
    report = VerifyReport(warnings=list(plan.warnings))
    try:
        runner = session(onnx_dir)
    except _ORT_ERRORS as exc:
        report.checks.append(Check("graph loads in ONNX Runtime", 0.0, 0.0, 0.0, False, _first_line(exc)))
        return report
    report.checks.append(_check_graph(onnx_dir, runner, manifest))
    if manifest.mode == "bank":
        report.checks.extend(_check_bank(runner, manifest, base, loaded))
        return report
    exact_model = _unmerged(base, loaded, manifest.task, torch.float64)
    inputs = model_inputs(exact_model.body.config.vocab_size)
    exact = _outputs(exact_model, inputs)
    del exact_model
    single = _outputs(_unmerged(base, loaded, manifest.task, torch.float32), inputs)
    for batch, want, same_precision in zip(inputs, exact, single):
        report.checks.append(_check_output(runner, manifest.output, batch, want, same_precision))
    return report


def _first_line(exc: Exception) -> str:
    return f"ONNX Runtime failed: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"


def _unmerged(base: Path, adapters: list[VeraAdapter], task: str, dtype: torch.dtype) -> GraphOutput:
    """The base model with the adapters unmerged (`VeraLinear`), computing in `dtype`: the reference."""
    return GraphOutput(apply_vera(load_model(base, dtype), [cast_adapter(a, dtype) for a in adapters]), task)


@torch.no_grad()
def _outputs(model: GraphOutput, inputs: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
    return [model(**batch).numpy() for batch in inputs]


def bank_inputs(vocab_size: int, n: int) -> list[dict[str, torch.Tensor]]:
    """Fixed inputs for a bank of `n` adapters, with `adapter_index`.

    First every adapter in one batch of length 7, in reverse order (at least two rows, the second left-padded),
    then one row of length 16 run by adapter 0.
    """
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index, length in ((torch.arange(max(n, 2)).flip(0) % n, 7), (torch.zeros(1, dtype=torch.int64), 16)):
        input_ids = torch.randint(0, vocab_size, (len(index), length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1:2, : length // 3] = 0
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, ADAPTER_INDEX: index})
    return batches


def _check_bank(
    runner: ort.InferenceSession, manifest: Manifest, base: Path, adapters: list[VeraAdapter]
) -> list[Check]:
    """Per input shape, every row of the graph's output against the unmerged model of that row's adapter."""
    inputs = bank_inputs(model_class(base).config_class.from_pretrained(base).vocab_size, len(adapters))
    exact = _bank_outputs(base, adapters, manifest.task, torch.float64, inputs)
    single = _bank_outputs(base, adapters, manifest.task, torch.float32, inputs)
    checks = []
    for batch, want, same_precision in zip(inputs, exact, single):
        check = _check_output(runner, manifest.output, batch, want, same_precision)
        rows = ", ".join(map(str, batch[ADAPTER_INDEX].tolist()))
        checks.append(dataclasses.replace(check, name=f"{check.name}, rows run adapters [{rows}]"))
    return checks


@torch.no_grad()
def _bank_outputs(
    base: Path,
    adapters: list[VeraAdapter],
    task: str,
    dtype: torch.dtype,
    inputs: list[dict[str, torch.Tensor]],
) -> list[np.ndarray]:
    """Each batch row computed by the unmerged model of its own adapter, one model in memory at a time."""
    outputs: list[np.ndarray | None] = [None] * len(inputs)
    for k, adapter in enumerate(adapters):
        model = _unmerged(base, [adapter], task, dtype)
        for b, batch in enumerate(inputs):
            rows = (batch[ADAPTER_INDEX] == k).nonzero().flatten()
            if len(rows) == 0:
                continue
            output = model(batch["input_ids"][rows], batch["attention_mask"][rows]).numpy()
            if outputs[b] is None:
                outputs[b] = np.zeros((len(batch[ADAPTER_INDEX]), *output.shape[1:]), dtype=output.dtype)
            outputs[b][rows.numpy()] = output
        del model
    return outputs


def _check_output(
    runner: ort.InferenceSession,
    name: str,
    batch: dict[str, torch.Tensor],
    want: np.ndarray,
    same_precision: np.ndarray,
) -> Check:
    """The graph's output on `batch` against the float64 reference `want` (see `verify_onnx` for the tolerance)."""
    shape = "x".join(map(str, batch["input_ids"].shape))
    try:
        got = runner.run([name], {key: value.numpy() for key, value in batch.items()})[0]
    except _ORT_ERRORS as exc:
        return Check(f"onnx {name} [{shape}]", math.inf, math.inf, 0.0, False, _first_line(exc))
    if got.ndim >= 3:  # [batch, sequence, ...]: compare the positions the mask keeps
        keep = batch["attention_mask"].numpy().astype(bool)
        got, want, same_precision = got[keep], want[keep], same_precision[keep]
    error = float(np.abs(got.astype(np.float64) - want).max())
    torch_error = float(np.abs(same_precision.astype(np.float64) - want).max())
    scale = float(np.abs(want).max()) or 1.0
    tolerance = PRECISION_FACTOR * torch_error + FLOOR_ROUNDOFFS * 2.0**-24 * scale
    return Check(
        f"onnx {name} [{shape}]",
        error,
        error / scale,
        tolerance,
        error <= tolerance,
        detail=f"PyTorch float32 is off by {torch_error:.3g}",
    )


def _check_graph(onnx_dir: Path, runner: ort.InferenceSession, manifest: Manifest) -> Check:
    problems = []
    inputs = [(i.name, i.type, len(i.shape)) for i in runner.get_inputs()]
    expected_inputs = [(name, "tensor(int64)", 2) for name in INPUT_NAMES]
    if manifest.mode == "bank":
        expected_inputs.append((ADAPTER_INDEX, "tensor(int64)", 1))
    if inputs != expected_inputs:
        problems.append(
            f"inputs are {inputs}, expected int64 [batch, sequence] {', '.join(INPUT_NAMES)}"
            + (f" and int64 [batch] {ADAPTER_INDEX}" if manifest.mode == "bank" else "")
        )
    outputs = [o.name for o in runner.get_outputs()]
    if outputs != [manifest.output]:
        problems.append(f"outputs are {outputs}, expected [{manifest.output!r}]")
    overridable = {i.name: i.shape for i in runner.get_overridable_initializers()}
    expected = {name: spec["shape"] for name, spec in manifest.overridable.items()}
    if overridable != expected:
        differ = sorted(overridable.keys() ^ expected.keys())
        differ = differ or sorted(name for name in expected if overridable[name] != expected[name])
        problems.append(f"overridable inputs differ from {MANIFEST_NAME}'s: {', '.join(differ[:5])}")
    if manifest.mode in ("adapter", "bank"):
        problems += _check_projections(onnx_dir, manifest)
    return Check(
        "graph inputs, outputs and overridable tensors",
        0.0,
        0.0,
        0.0,
        not problems,
        detail="; ".join(problems) or f"{len(overridable)} overridable",
    )


def _check_projections(onnx_dir: Path, manifest: Manifest) -> list[str]:
    initializers = ir.load(onnx_dir / MODEL_NAME).graph.initializers
    if VERA_A not in initializers or VERA_B not in initializers:
        return [f"the graph holds no {VERA_A} / {VERA_B}"]
    vera_A, vera_B = (torch.from_numpy(initializers[n].const_value.numpy().copy()) for n in (VERA_A, VERA_B))
    if projection_digest(vera_A, vera_B) != manifest.projections["sha256"]:
        return [f"{VERA_A} / {VERA_B} differ from the projections the manifest records"]
    return []
