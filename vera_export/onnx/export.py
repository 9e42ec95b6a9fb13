"""`vera-export onnx`: the base model with VeRA adapters as an ONNX graph, verified in ONNX Runtime.

Every mode loads the base in the signature's dtype and exports it with torch.onnx's dynamo exporter (see
`graph`); what differs between modes is in `modes`. Projections are resolved against the base checkpoint as
`merge` resolves them (regenerated ones rounded to a 16-bit base's dtype, as PEFT does), so the float32 graph of a
16-bit base computes the function that PEFT's 16-bit model computes in 16-bit arithmetic.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import torch

from ..adapter import VeraAdapter, load_adapter
from ..errors import CheckpointError, counted
from ..io.index import ShardedTensorIndex
from ..io.locations import Kind, locate
from ..io.outputs import staged_output
from ..io.side_files import side_files
from ..modeling import load_model, model_class, model_config
from ..names import model_names
from ..options import OnnxOptions, VerifyOnnxOptions
from ..progress import stage_bar
from ..reports import duration
from ..verification import VerifyReport
from . import generation
from . import graph as passes
from .manifest import Manifest, projection_fingerprint
from .modes import MODES, ExportMode, Resolution
from .signature import PRECISIONS, TASKS, Signature, Task
from .verify import verify_onnx

_EXPORT_STAGES = ("loading", "tracing", "optimizing", "writing")


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
    verification: VerifyReport | None = None
    warnings: list[str] = field(default_factory=list)
    command = "onnx"

    @property
    def ok(self) -> bool:
        return self.verification is None or self.verification.ok

    def text(self, quiet: bool = False) -> str:
        line = (
            f"exported {self.task} graph ({self.mode} mode, {counted(self.overridable, 'overridable tensor')}) "
            f"to {self.output}: {', '.join(self.files)} ({duration(self.seconds)})"
        )
        return line if self.verification is None else line + "\n" + self.verification.text(quiet)


def resolve_task(base: Path, task: str) -> Task:
    """The task to export: `task` itself, checked against the architecture, or the one `"auto"` picks.

    Raises:
        CheckpointError: The architecture does not do `task`, or `"auto"` cannot tell.
    """
    cls = model_class(base)
    architecture = cls.__name__
    if task != "text-generation":  # GenAI's builder serves its own list of architectures (`generation.check`)
        _refuse_untraceable(base, cls)
    if task == "auto":
        found = next((t for t in TASKS.values() if architecture.endswith(t.suffixes)), None)
        if found is None:
            raise CheckpointError(
                f"{base}: cannot tell the task of {architecture}; pass --task ({', '.join(TASKS)})"
            )
        return found
    chosen = TASKS[task]
    if not chosen.base_model and not architecture.endswith(chosen.suffixes):
        raise CheckpointError(
            f"{base}: {architecture} is not a {task} model; pass --task auto or --task feature-extraction"
        )
    return chosen


# Config fields by which transformers' mixture-of-experts models give their number of experts.
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_MERGE_THEN = (
    "merge the adapter into the weights (vera-export merge, then vera-export verify) and export the merged "
    "checkpoint with optimum (optimum-cli export onnx --model MERGED OUT)"
)


def _refuse_untraceable(base: Path, cls: type) -> None:
    """Refuse, before any work, what one traced forward pass over token ids cannot export.

    Raises:
        CheckpointError: An encoder-decoder (its graphs are an encoder and a decoder with past), a model that reads
            something other than token ids (speech, images), or a mixture of experts (its routing depends on the
            data, which torch.onnx cannot trace); each names the architecture and what to do instead.
    """
    config, architecture = model_config(base), cls.__name__
    main = getattr(cls, "main_input_name", "input_ids")
    if getattr(config, "is_encoder_decoder", False):
        reason = "is an encoder-decoder model, exported as an encoder and a decoder with past"
    elif main != "input_ids":
        reason = f"reads {main}, not token ids"
    elif any(isinstance(n, int) and n > 1 for n in (getattr(config, key, None) for key in _EXPERT_COUNTS)):
        reason = "routes tokens among experts (mixture of experts), which torch.onnx cannot trace"
    else:
        return
    raise CheckpointError(
        f"{base}: {architecture} {reason}; ONNX export here traces one pass over token ids - {_MERGE_THEN}"
    )


def export_onnx(
    base: str | Path,
    adapters: Sequence[str | Path | VeraAdapter],
    output: str | Path,
    options: OnnxOptions = OnnxOptions(),
) -> OnnxReport:
    """Export the base model with VeRA adapters to `OUTPUT/model.onnx`, then verify it (unless told not to).

    Writes `model.onnx` (and `model.onnx.data` with external data), `vera_export.json` (see `manifest`) and the
    base's config and tokenizer files. This is the `onnx` command (`vera_export.onnx` is this package).

    Args:
        base: Hugging Face model directory (config.json and safetensors weights).
        adapters: PEFT VeRA adapter directories or loaded adapters; exactly one in adapter mode; in bank mode
            row k of the bank is `adapters[k]`.
        output: Directory to create; written in full or not at all.
        options: See `OnnxOptions`.

    Returns:
        The report; `report.ok` is the verdict when verification ran.

    Raises:
        AdapterError, IncompatibleAdapterError, CheckpointError, OutputError: Before anything is written.
    """
    started = time.perf_counter()
    base, output = locate(base, Kind.BASE), Path(output)
    mode, precision = MODES[options.mode], PRECISIONS[options.precision]
    loaded = [load_adapter(a, options.allow_pickle) for a in adapters]
    index = model_names(base, ShardedTensorIndex.from_dir(base), loaded).index
    resolution = mode.resolve(index, loaded, options.rounding)
    task = resolve_task(base, options.task)
    signature = mode.signature(task, precision.dtype)
    if task.generation:
        generation.check(base, mode, resolution)
        stages, external_data = generation.STAGES, True
    else:
        stages = _EXPORT_STAGES
        external_data = passes.needs_external_data(index, signature.dtype, options.external_data)
    adapter_paths = [str(a.path) for a in resolution.adapters]
    report = OnnxReport(output, mode.name, task.name, adapter_paths, warnings=list(resolution.warnings))
    side = None if task.generation else side_files(base, index.shards)  # checked before anything is written
    if side is not None:
        report.warnings.extend(side.warnings())
    stages = [*stages, *(["verifying"] if options.verify else [])]
    with stage_bar(stages, f"exporting ({mode.name})", options.progress) as start:
        with staged_output(output, [base, *(a.path for a in resolution.adapters)], options.force) as staging:
            manifest = Manifest(
                mode=mode.name,
                task=task.name,
                output=task.output,
                opset=options.opset,
                adapters=adapter_paths,
                rounding=options.rounding.value,
                base_tensors={
                    name: [str(info.dtype).removeprefix("torch."), list(info.shape)]
                    for name, info in index.tensors.items()
                },
                precision=precision.name,
            )
            if task.generation:
                generation.build(base, index, mode, resolution, precision, staging, manifest, start)
            else:
                graph = _build_graph(base, mode, resolution, task, signature, options.opset, manifest, start)
                start("writing")
                passes.save(graph, staging, external_data)
                del graph  # its weights, before verification loads the model twice more
                gc.collect()  # the graph's nodes and values reference each other: only the collector frees them
                side.copy(staging)
            manifest.write(staging)
            report.files = sorted(p.name for p in staging.iterdir())
            report.overridable = len(manifest.overridable)
        if options.verify:
            start("verifying")
            report.verification = verify_onnx(
                output, base, resolution.adapters, VerifyOnnxOptions(allow_pickle=options.allow_pickle)
            )
    report.seconds = time.perf_counter() - started
    return report


def _build_graph(
    base: Path,
    mode: ExportMode,
    resolution: Resolution,
    task: Task,
    signature: Signature,
    opset: int,
    manifest: Manifest,
    start: Callable[[str], None],
) -> ir.Model:
    """The optimized graph; records its overridable inputs and projections in `manifest`.

    Calls `start` with each of the loading, tracing and optimizing stages.
    """
    start("loading")
    model = load_model(base, signature.dtype)
    start("tracing")
    module, trained = mode.module(model, resolution, task)
    graph = passes.trace(module, signature, opset, type(module.body).__name__)
    shared = set()
    if resolution.projections is not None:
        projections = resolution.projections
        # The branch computes in float32 whatever the graph's dtype, as PEFT computes it (autocast_adapter_dtype).
        vera_A, vera_B = (p.to(torch.float32) for p in (projections.vera_A, projections.vera_B))
        shared = passes.name_projections(graph, vera_A, vera_B)
        manifest.overridable = passes.expose_trained_tensors(graph, module, trained)
        manifest.projections = projection_fingerprint(resolution.adapters[0], projections)
        manifest.layers, manifest.replaced = resolution.layers, resolution.replaced
    del model, module
    start("optimizing")
    passes.optimize(graph, shared)
    mode.after_optimize(graph, manifest)
    return graph
