"""ONNX Runtime adapter files for graphs exported in adapter or bank mode, and the manifest that keeps them honest.

An adapter-mode graph (see `onnx_export`) holds the shared projections once, as `vera.vera_A` / `vera.vera_B`, and
reads every trained tensor from an overridable graph input: `vera.<module>.lambda_b` / `.lambda_d` per adapted
layer and `vera.<tensor name>` for trained biases and `modules_to_save` tensors, each with the exported adapter's
values as its default. Another adapter of the same base and projections is therefore nothing but new values for
those inputs, which ONNX Runtime's own adapter format (`onnxruntime.AdapterFormat`, applied per request with
`RunOptions.add_active_adapter`) supplies.

A bank graph (see `bank`) has the same inputs with a leading adapter axis: `[n, ...]`, one row per adapter, the axis
declared symbolic (`"adapters"`) so that a file may hold a bank of another size. A file for it holds every table,
stacked from a list of adapters.

ONNX Runtime checks nothing when it loads such a file: a wrong name or shape fails at run time and other
projections compute nonsense silently. So the export writes `vera_export.json` next to `model.onnx`, recording what
the graph was built from (the base's tensor shapes and dtypes, the projections' r, key, shapes and SHA-256, the
adapted layers, the replaced tensors, every overridable input), and `onnx_adapter` refuses an adapter that does not
fit it without needing the base model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from .adapter import VeraAdapter, load_adapter
from .errors import CheckpointError, IncompatibleAdapterError, OutputError
from .outputs import check_outside_inputs
from .plan import Projections, resolve_projections
from .projections import Rounding
from .targets import incompatibilities, match_layers

MANIFEST_NAME = "vera_export.json"
FORMAT = "vera-export onnx 1"
VERA_A, VERA_B = "vera.vera_A", "vera.vera_B"
# The symbolic leading axis of a bank graph's tables, as declared in the graph and recorded in the manifest.
ADAPTERS_AXIS = "adapters"


def lambda_input(module: str, kind: str) -> str:
    """Graph input holding one layer's `lambda_b` or `lambda_d` (`kind` is `"b"` or `"d"`)."""
    return f"vera.{module}.lambda_{kind}"


def tensor_input(name: str) -> str:
    """Graph input holding a trained tensor that replaces the base tensor `name` (a bias, a head)."""
    return f"vera.{name}"


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Manifest:
    """What an exported graph was built from; written as `vera_export.json` next to `model.onnx`.

    Attributes:
        mode: `"merged"`, `"adapter"` or `"bank"`.
        task: The task the graph computes (`causal-lm`, `sequence-classification`, `feature-extraction`).
        output: The graph's output name (`logits` or `last_hidden_state`).
        opset: The ONNX opset.
        adapters: The adapter directories exported, in order (in a bank, row k of every table is `adapters[k]`).
        rounding: The CPU rounding projections were regenerated with.
        base_tensors: The base checkpoint's tensors, name -> (dtype, shape): enough to match another adapter
            against the base exactly as `targets.match_layers` does, without the base.
        projections: Adapter and bank mode: r, projection_prng_key, the shapes of vera_A / vera_B and the SHA-256
            of their float32 values.
        layers: Adapter and bank mode: the adapted modules (in a bank, those of any of its adapters).
        replaced: Adapter and bank mode: the base tensors the adapters replace (trained biases, modules_to_save).
        overridable: Adapter and bank mode: every overridable graph input, name -> {"shape", "dtype"}; a bank's
            shapes start with `ADAPTERS_AXIS`. Trained tensors the graph does not use (a classifier head in a
            feature-extraction graph) have none.
    """

    mode: str
    task: str
    output: str
    opset: int
    adapters: list[str]
    rounding: str
    base_tensors: dict[str, tuple[str, list[int]]]
    projections: dict | None = None
    layers: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    overridable: dict[str, dict] = field(default_factory=dict)

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_NAME).write_text(
            json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n"
        )

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """Read `DIRECTORY/vera_export.json`.

        Raises:
            CheckpointError: The directory holds no export of this tool, or one of another format version.
        """
        path = Path(directory) / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(
                f"{path.parent}: no {MANIFEST_NAME}; point at a directory written by `vera-export onnx`"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"{path}: not a readable JSON file ({exc}); export the model again"
            ) from None
        if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
            raise CheckpointError(
                f"{path}: not a {FORMAT!r} manifest; export the model again with this version"
            )
        try:
            return cls(**raw)
        except TypeError as exc:
            raise CheckpointError(f"{path}: malformed manifest ({exc}); export the model again") from None

    def base_specs(self) -> dict[str, _TensorSpec]:
        return {
            name: _TensorSpec(tuple(shape), getattr(torch, dtype))
            for name, (dtype, shape) in self.base_tensors.items()
        }


def projection_digest(vera_A: torch.Tensor, vera_B: torch.Tensor) -> str:
    """SHA-256 of the float32 values of `vera_A`, then `vera_B`."""
    digest = hashlib.sha256()
    for tensor in (vera_A, vera_B):
        digest.update(tensor.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def projection_fingerprint(adapter: VeraAdapter, projections: Projections) -> dict:
    """r, key, shapes and digest of an adapter's projections: what another adapter must match."""
    return {
        "r": adapter.config.r,
        "projection_prng_key": adapter.config.projection_prng_key,
        "vera_A": list(projections.vera_A.shape),
        "vera_B": list(projections.vera_B.shape),
        "sha256": projection_digest(projections.vera_A, projections.vera_B),
    }


def trained_inputs(adapter: VeraAdapter) -> dict[str, torch.Tensor]:
    """The adapter's trained tensors by the name of the graph input that holds them."""
    tensors = {lambda_input(m, "b"): layer.lambda_b for m, layer in adapter.layers.items()}
    tensors |= {lambda_input(m, "d"): layer.lambda_d for m, layer in adapter.layers.items()}
    tensors |= {tensor_input(name): t for name, t in adapter.replacements.items()}
    return tensors


def stack_inputs(
    adapters: Sequence[VeraAdapter], shapes: Mapping[str, Sequence[int]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A bank's tables: for each graph input, the adapters' tensors stacked `[n, *shape]`, in `dtype`.

    An adapter without lambdas for a layer gets zeros there (its delta is then exactly zero, as PEFT leaves the
    layer alone). Trained tensors must be present in every adapter (`bank.build_bank` checks that).
    """
    found = [trained_inputs(adapter) for adapter in adapters]
    tables = {}
    for name, shape in shapes.items():
        zeros = torch.zeros(tuple(shape), dtype=dtype) if name.endswith((".lambda_b", ".lambda_d")) else None
        tables[name] = torch.stack([f[name].to(dtype) if name in f else zeros for f in found])
    return tables


def adapter_values(manifest: Manifest, adapter: VeraAdapter) -> dict[str, np.ndarray]:
    """The values of an adapter-mode graph's overridable inputs that make it compute `adapter`.

    Raises:
        CheckpointError: The graph was not exported in adapter mode.
        IncompatibleAdapterError: Listing every way the adapter differs from the graph's: base, projections,
            adapted layers, replaced tensors.
    """
    if manifest.mode != "adapter":
        raise CheckpointError(
            f"the graph was exported in {manifest.mode} mode; only a graph exported with --mode adapter takes "
            f"one adapter's values"
        )
    _refuse_misfits(manifest, [adapter])
    tensors = trained_inputs(adapter)
    # Tensors the graph does not use (a head dropped by the task) have no input and are left out.
    return {
        name: tensors[name].to(getattr(torch, spec["dtype"])).contiguous().numpy()
        for name, spec in manifest.overridable.items()
    }


def bank_values(manifest: Manifest, adapters: Sequence[VeraAdapter]) -> dict[str, np.ndarray]:
    """The tables of a bank graph that make row k of its batch compute `adapters[k]`.

    The count need not be the exported bank's: the graph declares the tables' leading axis symbolic.

    Raises:
        CheckpointError: The graph was not exported in bank mode.
        IncompatibleAdapterError: Listing every way each adapter differs from the graph's: base, projections,
            adapted layers (an adapter may adapt fewer, not other), replaced tensors (the same).
    """
    if manifest.mode != "bank":
        raise CheckpointError(
            f"the graph was exported in {manifest.mode} mode; only a graph exported with --mode bank takes a bank "
            f"of adapters"
        )
    if not adapters:
        raise IncompatibleAdapterError("a bank needs at least one adapter")
    _refuse_misfits(manifest, adapters)
    shapes = {name: spec["shape"][1:] for name, spec in manifest.overridable.items()}
    tables = stack_inputs(adapters, shapes, torch.float32)
    return {
        name: tables[name].to(getattr(torch, spec["dtype"])).contiguous().numpy()
        for name, spec in manifest.overridable.items()
    }


def _refuse_misfits(manifest: Manifest, adapters: Sequence[VeraAdapter]) -> None:
    misfits = [(adapter, problems) for adapter in adapters if (problems := _differences(manifest, adapter))]
    if misfits:
        raise IncompatibleAdapterError(
            "; ".join(
                f"{adapter.path}: does not fit the exported graph ({len(problems)} problems): "
                + "; ".join(problems)
                for adapter, problems in misfits
            )
        )


def _differences(manifest: Manifest, adapter: VeraAdapter) -> list[str]:
    specs = manifest.base_specs()
    shapes = {name: spec.shape for name, spec in specs.items()}
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
        prng_key = ours["projection_prng_key"]
        source = (
            "stored in the adapter"
            if projections.stored
            else f"regenerated from projection_prng_key {prng_key}"
        )
        problems.append(
            f"projections: vera_A / vera_B ({source}) differ from the graph's (projection_prng_key "
            f"{theirs['projection_prng_key']}); the adapter was trained with other projections"
        )
    # A bank's file holds whole tables: a layer the adapter leaves alone gets zero lambdas, not stale ones.
    fewer_layers = manifest.mode == "bank"
    problems += _set_difference(
        "adapted layers", set(adapter.layers), set(manifest.layers), fewer_ok=fewer_layers
    )
    problems += _set_difference("trained tensors", set(adapter.replacements), set(manifest.replaced))
    return problems


def _set_difference(what: str, ours: set[str], graphs: set[str], fewer_ok: bool = False) -> list[str]:
    problems = []
    if graphs - ours and not fewer_ok:
        problems.append(
            f"{what} of the graph missing from the adapter (they would keep the exported adapter's values): "
            f"{_some(graphs - ours)}"
        )
    if ours - graphs:
        problems.append(f"{what} of the adapter that the graph does not have: {_some(ours - graphs)}")
    return problems


def _some(names: set[str], shown: int = 8) -> str:
    ordered = sorted(names)
    more = f" and {len(ordered) - shown} more" if len(ordered) > shown else ""
    return ", ".join(ordered[:shown]) + more


@dataclass
class OnnxAdapterReport:
    """What `onnx_adapter` wrote."""

    output: Path
    parameters: int
    bytes_written: int

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "parameters": self.parameters,
            "bytes_written": self.bytes_written,
        }


def onnx_adapter(
    model_dir: str | Path,
    adapters: str | Path | VeraAdapter | Sequence[str | Path | VeraAdapter],
    output_file: str | Path,
    force: bool = False,
    allow_pickle: bool = False,
) -> OnnxAdapterReport:
    """Write VeRA adapters as an ONNX Runtime adapter file for a graph exported in adapter or bank mode.

    Load it with `onnxruntime.LoraAdapter().Load(path)` and apply it per request with
    `RunOptions.add_active_adapter`. The file holds the lambdas and trained tensors only, in the graph's dtypes.

    Args:
        model_dir: Directory written by `onnx_export.onnx` with `mode="adapter"` or `mode="bank"`.
        adapters: For an adapter-mode graph, one PEFT VeRA adapter of the same base, projections, adapted layers
            and trained tensors. For a bank graph, one or more (any count), each of the same base, projections and
            trained tensors, adapting some of the graph's layers; row k of the bank becomes `adapters[k]`.
        output_file: The `.onnx_adapter` file to write.
        force: Replace an existing file.
        allow_pickle: Read `adapter_model.bin` when there is no safetensors file.

    Raises:
        CheckpointError: `model_dir` is not an adapter-mode or bank export, or an adapter-mode one given several
            adapters.
        IncompatibleAdapterError: An adapter does not fit the graph (see `adapter_values`, `bank_values`).
        OutputError: `output_file` exists (without `force`), is a directory, or lies inside `model_dir` or an
            adapter directory.
    """
    manifest = Manifest.read(model_dir)
    many = [adapters] if isinstance(adapters, (str, Path, VeraAdapter)) else list(adapters)
    loaded = [load_adapter(a, allow_pickle) for a in many]
    output = Path(output_file)
    check_outside_inputs(output, [Path(model_dir), *(a.path for a in loaded)])
    if output.is_dir() or (output.exists() and not force):
        raise OutputError(f"{output}: exists; choose another file name or pass --force to replace it")
    if manifest.mode == "bank":
        values = bank_values(manifest, loaded)
    elif manifest.mode == "adapter" and len(loaded) != 1:
        raise CheckpointError(
            f"{model_dir}: the graph was exported in adapter mode and takes one adapter, got {len(loaded)}; "
            f"export a bank (--mode bank) to serve several at once"
        )
    else:
        values = adapter_values(manifest, loaded[0])
    write_adapter_file(values, output)
    return OnnxAdapterReport(output, sum(v.size for v in values.values()), output.stat().st_size)


def write_adapter_file(values: Mapping[str, np.ndarray], output: Path) -> None:
    """Write `values` in ONNX Runtime's adapter format, atomically (a temporary file renamed into place)."""
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    adapter_format = ort.AdapterFormat()
    adapter_format.set_adapter_version(1)
    adapter_format.set_model_version(1)
    adapter_format.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in values.items()})
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        adapter_format.export_adapter(str(staging))
        os.replace(staging, output)
    except (OSError, RuntimeError) as exc:  # ONNX Runtime reports a file it cannot open as RuntimeError
        reason = (
            exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
        )
        raise OutputError(f"{output}: cannot be written ({reason}); choose a writable location") from None
    finally:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            staging.unlink()
