"""`vera-export verify --onnx`: an exported graph, run in ONNX Runtime, against the unmerged VeRA model in PyTorch.

One check that the graph's inputs, outputs and overridable inputs are those its signature and `vera_export.json`
say (and that `vera.vera_A` / `vera.vera_B` hash to the recorded SHA-256); then, per input shape, the graph's
output against the base model with the adapters unmerged (`layers.apply_vera`, which is PEFT's forward) computed
in float64. Positions masked out by `attention_mask` are not compared: their values mean nothing and the exported
graph masks fully masked rows differently from eager PyTorch. The tolerance is `PRECISION_FACTOR` times PyTorch's
own error in the graph's dtype on the same inputs, plus `FLOOR_ROUNDOFFS` roundoffs of the largest output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from ..adapter import VeraAdapter, load_adapter
from ..checks import Check, Comparison
from ..errors import AdapterError
from ..io.index import ShardedTensorIndex
from ..io.locations import Kind, locate
from ..layers import apply_vera
from ..model_check import cast_adapter
from ..modeling import load_model, model_config
from ..names import model_names
from ..options import Rounding, VerifyOnnxOptions
from ..verification import VerifyReport
from .graph import MODEL_NAME
from .manifest import MANIFEST_NAME, Manifest, projection_digest
from .modes import MODES, ExportMode, TaskOutput
from .runtime import ORT_ERRORS, first_line, session
from .signature import ADAPTER_INDEX, PRECISIONS, TASKS, VERA_A, VERA_B, Signature, Task

PRECISION_FACTOR = 4.0
FLOOR_ROUNDOFFS = 16.0


def verify_onnx(
    onnx_dir: str | Path,
    base: str | Path,
    adapters: Sequence[str | Path | VeraAdapter],
    options: VerifyOnnxOptions = VerifyOnnxOptions(),
) -> VerifyReport:
    """Compare an exported graph, run in ONNX Runtime, with the unmerged VeRA model in PyTorch.

    A bank runs every adapter in one batch, each row against the unmerged model of its own adapter alone.

    Args:
        onnx_dir: Directory written by `export_onnx`.
        base: The base model directory.
        adapters: The adapters exported, in order (in adapter mode, the one whose values are the defaults; in bank
            mode, row k of the default tables is `adapters[k]`).
        options: See `VerifyOnnxOptions`.

    Returns:
        The report; `report.passed` is the verdict.
    """
    onnx_dir, base = locate(onnx_dir, Kind.EXPORT), locate(base, Kind.BASE)
    manifest = Manifest.read(onnx_dir)
    mode, task = MODES[manifest.mode], TASKS[manifest.task]
    loaded = [load_adapter(a, options.allow_pickle) for a in adapters]
    index = model_names(base, ShardedTensorIndex.from_dir(base), loaded).index
    resolution = mode.resolve(index, loaded, Rounding(manifest.rounding))
    if mode.stacked and len(loaded) != len(manifest.adapters):
        raise AdapterError(
            f"{onnx_dir}: the bank holds {len(manifest.adapters)} adapters and {len(loaded)} were given; pass "
            f"every adapter it was exported with, in order, so that each row is checked"
        )
    report = VerifyReport(warnings=list(resolution.warnings))
    if task.generation:
        from .generation_verify import verify_generation  # ONNX Runtime GenAI: an optional extra

        report.checks.extend(verify_generation(onnx_dir, base, resolution.adapters, manifest))
        return report
    signature = mode.signature(task, PRECISIONS[manifest.precision].dtype)
    # The references first, one model at a time, and only then the session: the float64 model and ONNX Runtime's
    # copy of the weights are never in memory together.
    inputs = mode.verification_inputs(model_config(base).vocab_size, len(loaded))
    exact = _reference(base, mode, resolution.adapters, task, torch.float64, inputs)
    same_precision = _reference(base, mode, resolution.adapters, task, signature.dtype, inputs)
    try:
        runner = session(onnx_dir)
    except ORT_ERRORS as exc:
        report.checks.append(Check("graph loads in ONNX Runtime", 0.0, 0.0, 0.0, False, first_line(exc)))
        return report
    report.checks.append(_check_graph(onnx_dir, runner, manifest, signature))
    for batch, want, single in zip(inputs, exact, same_precision):
        check = _check_output(runner, signature, batch, want, single)
        if ADAPTER_INDEX in batch:
            rows = ", ".join(map(str, batch[ADAPTER_INDEX].tolist()))
            check = dataclasses.replace(check, name=f"{check.name}, rows run adapters [{rows}]")
        report.checks.append(check)
    return report


@torch.no_grad()
def _reference(
    base: Path,
    mode: ExportMode,
    adapters: list[VeraAdapter],
    task: Task,
    dtype: torch.dtype,
    inputs: list[dict[str, torch.Tensor]],
) -> list[np.ndarray]:
    """The unmerged model's outputs on `inputs`, computing in `dtype`, each row by the adapters the mode says
    (`ExportMode.row_groups`); one model in memory at a time."""
    uses: dict[tuple[int, ...], tuple[list[VeraAdapter], list]] = {}
    for b, batch in enumerate(inputs):
        for group, rows in mode.row_groups(batch, adapters):
            uses.setdefault(tuple(map(id, group)), (group, []))[1].append((b, rows))
    outputs: list[np.ndarray | None] = [None] * len(inputs)
    for group, batches in uses.values():
        model = TaskOutput(apply_vera(load_model(base, dtype), [cast_adapter(a, dtype) for a in group]), task)
        for b, rows in batches:
            ids, mask = inputs[b]["input_ids"], inputs[b]["attention_mask"]
            if rows is None:
                outputs[b] = model(ids, mask).numpy()
                continue
            output = model(ids[rows], mask[rows]).numpy()
            if outputs[b] is None:
                outputs[b] = np.zeros((len(ids), *output.shape[1:]), dtype=output.dtype)
            outputs[b][rows.numpy()] = output
        del model
    return outputs


def _check_output(
    runner: ort.InferenceSession,
    signature: Signature,
    batch: dict[str, torch.Tensor],
    want: np.ndarray,
    same_precision: np.ndarray,
) -> Check:
    """The graph's output on `batch` against the float64 reference `want` (see the module docstring)."""
    (name,) = signature.outputs
    shape = "x".join(map(str, batch["input_ids"].shape))
    try:
        got = runner.run([name], {key: value.numpy() for key, value in batch.items()})[0]
    except ORT_ERRORS as exc:
        return Check(f"onnx {name} [{shape}]", math.inf, math.inf, 0.0, False, first_line(exc))
    if got.ndim >= 3:  # [batch, sequence, ...]: compare the positions the mask keeps
        keep = batch["attention_mask"].numpy().astype(bool)
        got, want, same_precision = got[keep], want[keep], same_precision[keep]
    compared = Comparison.of(got, want)
    # PyTorch in the graph's dtype, where it computes a number at all: NaN there would make any tolerance NaN.
    finite = np.isfinite(want) & np.isfinite(same_precision)
    torch_error = float(np.abs(same_precision[finite].astype(np.float64) - want[finite]).max(initial=0.0))
    tolerance = PRECISION_FACTOR * torch_error + FLOOR_ROUNDOFFS * signature.roundoff * compared.scale
    dtype = str(signature.dtype).removeprefix("torch.")
    # Where the reference is not finite (PyTorch's float64 model turns a fully masked padded row into NaN, which
    # some architectures carry into the row's other positions) ONNX Runtime may well compute numbers: those
    # positions cannot be checked, and are said to be left out.
    detail = "; ".join(filter(None, [f"PyTorch {dtype} is off by {torch_error:.3g}", compared.uncompared()]))
    return Check(
        f"onnx {name} [{shape}]",
        compared.error,
        compared.error / compared.scale,
        tolerance,
        compared.error <= tolerance,
        detail=detail,
    )


def _check_graph(
    onnx_dir: Path, runner: ort.InferenceSession, manifest: Manifest, signature: Signature
) -> Check:
    problems = []
    inputs = [(i.name, i.type, len(i.shape)) for i in runner.get_inputs()]
    expected_inputs = [(i.name, i.ort_type(), len(i.axes)) for i in signature.inputs]
    if inputs != expected_inputs:
        expected = ", ".join(
            f"{i.name} {str(i.dtype).removeprefix('torch.')} {list(i.axes)}" for i in signature.inputs
        )
        problems.append(f"inputs are {inputs}, expected {expected}")
    outputs = [o.name for o in runner.get_outputs()]
    if outputs != list(signature.outputs):
        problems.append(f"outputs are {outputs}, expected {list(signature.outputs)}")
    overridable = {i.name: i.shape for i in runner.get_overridable_initializers()}
    expected = {name: spec["shape"] for name, spec in manifest.overridable.items()}
    if overridable != expected:
        differ = sorted(overridable.keys() ^ expected.keys())
        differ = differ or sorted(name for name in expected if overridable[name] != expected[name])
        problems.append(f"overridable inputs differ from {MANIFEST_NAME}'s: {', '.join(differ[:5])}")
    if manifest.projections is not None:
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
