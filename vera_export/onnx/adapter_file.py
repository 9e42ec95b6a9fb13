"""`vera-export onnx-adapter`: other VeRA adapters of the same base, as ONNX Runtime adapter files.

A graph exported in adapter mode reads every trained tensor from an overridable input (`vera.<module>.lambda_b` /
`.lambda_d` per adapted layer, `vera.<tensor name>` for trained biases and `modules_to_save`), each holding the
exported adapter's values as its default. Another adapter of the same base and projections is nothing but new
values for those inputs, which ONNX Runtime's own adapter format (`onnxruntime.AdapterFormat`, applied per request
with `RunOptions.add_active_adapter`) supplies. A bank graph has the same inputs with a leading adapter axis, and a
file for it holds every table, stacked from a list of adapters.

ONNX Runtime checks nothing when it loads such a file, so every adapter is checked against `vera_export.json`
first, without the base model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..adapter import VeraAdapter, load_adapter
from ..errors import CheckpointError, IncompatibleAdapterError, OutputError, counted, listing
from ..io.locations import Kind, locate
from ..io.outputs import staged_output
from ..options import OnnxAdapterOptions, Rounding
from ..plan import resolve_projections
from ..targets import incompatibilities, match_layers
from .bank import stack_inputs
from .manifest import Manifest, projection_fingerprint
from .modes import MODES, ExportMode

ADAPTER_SUFFIX = ".onnx_adapter"


@dataclass
class OnnxAdapterReport:
    """What `onnx_adapter` wrote."""

    output: Path
    parameters: int
    bytes_written: int
    warnings: list[str] = field(default_factory=list)
    command = "onnx-adapter"
    ok = True

    def text(self, quiet: bool = False) -> str:
        return f"wrote {self.parameters} parameters to {self.output} ({self.bytes_written} bytes)"


def onnx_adapter(
    model_dir: str | Path,
    adapters: str | Path | VeraAdapter | Sequence[str | Path | VeraAdapter],
    output_file: str | Path,
    options: OnnxAdapterOptions = OnnxAdapterOptions(),
) -> OnnxAdapterReport:
    """Write VeRA adapters as an ONNX Runtime adapter file for a graph exported in adapter or bank mode.

    Load it with `onnxruntime.LoraAdapter().Load(path)` and apply it per request with
    `RunOptions.add_active_adapter`. The file holds the lambdas and trained tensors only, in the graph's dtypes.

    Args:
        model_dir: Directory written by `export_onnx` with `mode="adapter"` or `mode="bank"`.
        adapters: For an adapter-mode graph, one PEFT VeRA adapter of the same base, projections, adapted layers
            and trained tensors. For a bank graph, one or more (any count), each of the same base, projections and
            trained tensors, adapting some of the graph's layers; row k of the bank becomes `adapters[k]`.
        output_file: The `.onnx_adapter` file to write.
        options: See `OnnxAdapterOptions`.

    Raises:
        CheckpointError: `model_dir` is not an adapter-mode or bank export, or an adapter-mode one given several
            adapters.
        IncompatibleAdapterError: An adapter does not fit the graph: other base, projections, adapted layers or
            trained tensors, every difference listed.
        OutputError: `output_file` exists (without `force`), is a directory, lies inside an adapter directory,
            or inside `model_dir` without ending in `.onnx_adapter` (ONNX Runtime GenAI keeps adapter files in the
            model's folder).
    """
    model_dir = locate(model_dir, Kind.EXPORT)
    manifest = Manifest.read(model_dir)
    many = [adapters] if isinstance(adapters, (str, Path, VeraAdapter)) else list(adapters)
    loaded = [load_adapter(a, options.allow_pickle) for a in many]
    output = Path(output_file)
    inputs = [a.path for a in loaded]
    if model_dir.resolve() in output.resolve().parents:
        # GenAI's own layout keeps adapter files in the model's folder: a new one may go there, nothing else.
        if not output.name.endswith(ADAPTER_SUFFIX):
            raise OutputError(
                f"{output}: lies inside the exported model {model_dir}; only {ADAPTER_SUFFIX} files may be written "
                f"there, never the graph's own files"
            )
    else:
        inputs.append(model_dir)
    with staged_output(output, inputs, options.force, file=True) as staged:
        values = adapter_values(manifest, loaded, model_dir)
        write_adapter_file(values, staged)
    return OnnxAdapterReport(output, sum(v.size for v in values.values()), output.stat().st_size)


def adapter_values(
    manifest: Manifest, adapters: Sequence[VeraAdapter], model_dir: Path | None = None
) -> dict[str, np.ndarray]:
    """The values of a graph's overridable inputs that make it compute `adapters` (one, or a bank's rows).

    A bank's count need not be the exported bank's: the graph declares the tables' leading axis symbolic.

    Raises:
        CheckpointError: The graph has nothing to swap (merged mode), or takes another number of adapters.
        IncompatibleAdapterError: Listing every way each adapter differs from the graph's: base, projections,
            adapted layers (in a bank, an adapter may adapt fewer, not other), replaced tensors.
    """
    mode = MODES[manifest.mode]
    where = f"{model_dir}: " if model_dir is not None else ""
    if mode.file_adapters == 0:
        raise CheckpointError(
            f"{where}the graph was exported in {mode.name} mode, which has nothing to swap; export it with --mode "
            f"adapter (one adapter, swappable) or --mode bank (several, one per batch row) to write adapter files"
        )
    if mode.file_adapters is not None and len(adapters) != mode.file_adapters:
        raise CheckpointError(
            f"{where}the graph was exported in {mode.name} mode and takes one adapter, got {len(adapters)}; "
            f"export a bank (--mode bank) to serve several at once"
        )
    if not adapters:
        raise IncompatibleAdapterError("a bank needs at least one adapter")
    _refuse_misfits(manifest, mode, adapters)
    shapes = {
        name: spec["shape"][1:] if mode.stacked else spec["shape"]
        for name, spec in manifest.overridable.items()
    }
    tables = stack_inputs(adapters, shapes, torch.float32)
    # Tensors the graph does not use (a head dropped by the task) have no input and are left out.
    return {
        name: (tables[name] if mode.stacked else tables[name][0])
        .to(getattr(torch, spec["dtype"]))
        .contiguous()
        .numpy()
        for name, spec in manifest.overridable.items()
    }


def write_adapter_file(values: Mapping[str, np.ndarray], path: Path) -> None:
    """Write `values` in ONNX Runtime's adapter format at `path`."""
    adapter_format = ort.AdapterFormat()
    adapter_format.set_adapter_version(1)
    adapter_format.set_model_version(1)
    adapter_format.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in values.items()})
    try:
        adapter_format.export_adapter(str(path))
    except RuntimeError as exc:  # ONNX Runtime reports a file it cannot write as RuntimeError
        reason = (str(exc).strip().splitlines() or ["no reason given"])[0]
        raise OutputError(f"{path.name}: cannot be written ({reason}); choose a writable location") from None


def _refuse_misfits(manifest: Manifest, mode: ExportMode, adapters: Sequence[VeraAdapter]) -> None:
    misfits = [
        (adapter, problems) for adapter in adapters if (problems := _differences(manifest, mode, adapter))
    ]
    if misfits:
        raise IncompatibleAdapterError(
            "; ".join(
                f"{adapter.path}: does not fit the exported graph ({counted(len(problems), 'problem')}): "
                + "; ".join(problems)
                for adapter, problems in misfits
            )
        )


def _differences(manifest: Manifest, mode: ExportMode, adapter: VeraAdapter) -> list[str]:
    specs = manifest.base_specs()
    shapes = {name: tuple(spec.shape) for name, spec in specs.items()}
    problems = incompatibilities(adapter, shapes)
    if problems:
        return problems  # another base model: comparing projections would only add noise
    layers = match_layers(adapter, shapes)
    try:
        projections = resolve_projections(adapter, specs, layers, Rounding(manifest.rounding))
    except IncompatibleAdapterError as exc:
        return [str(exc)]
    ours, theirs = projection_fingerprint(adapter, projections), manifest.projections
    for key in ("r", "vera_A", "vera_B"):
        if ours[key] != theirs[key]:
            problems.append(f"projections: {key} is {ours[key]}, the graph's is {theirs[key]}")
    if not problems and ours["sha256"] != theirs["sha256"]:
        key = ours["projection_prng_key"]
        source = (
            "stored in the adapter" if projections.stored else f"regenerated from projection_prng_key {key}"
        )
        problems.append(
            f"projections: vera_A / vera_B ({source}) differ from the graph's (projection_prng_key "
            f"{theirs['projection_prng_key']}); the adapter was trained with other projections"
        )
    layers_ok = mode.fewer_layers_ok
    problems += _set_difference(
        "adapted layers", set(adapter.layers), set(manifest.layers), fewer_ok=layers_ok
    )
    problems += _set_difference("trained tensors", set(adapter.replacements), set(manifest.replaced))
    return problems


def _set_difference(what: str, ours: set[str], graphs: set[str], fewer_ok: bool = False) -> list[str]:
    problems = []
    if graphs - ours and not fewer_ok:
        problems.append(
            f"{what} of the graph missing from the adapter (they would keep the exported adapter's values): "
            f"{listing(sorted(graphs - ours), 8)}"
        )
    if ours - graphs:
        problems.append(
            f"{what} of the adapter that the graph does not have: {listing(sorted(ours - graphs), 8)}"
        )
    return problems
