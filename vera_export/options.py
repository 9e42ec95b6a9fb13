"""The options of every command, one frozen dataclass per command, shared by the CLI and the Python API.

Each field holds only what its command uses, and carries its own command-line flag and help text in its metadata
(`flag`): `vera-export`'s options are generated from these classes, so the two cannot drift. Fields whose flag is
None are Python-only tuning knobs. This module imports neither torch nor ONNX, so `--help` stays fast.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any


class Rounding(str, enum.Enum):
    """How torch's uniform kernel rounded `x * (high - low) + low` on the machine that drew the projections.

    `FMA`: a fused multiply-add, as torch's AVX2 / AVX-512 and aarch64 kernels compute it (every machine that
    trains models today). `SEPARATE`: a multiply, then an add, as its pre-AVX2 kernel does. See `projections`.
    """

    FMA = "fma"
    SEPARATE = "separate"


ONNX_MODES = ("merged", "adapter", "bank")
ONNX_TASKS = ("causal-lm", "sequence-classification", "feature-extraction", "text-generation")
ONNX_PRECISIONS = ("fp32", "fp16", "int4")
LORA_DTYPES = ("float32", "bfloat16", "float16")
MIN_OPSET = 18
# The newest opset the exporter's output passes onnx.checker with here (24 and up use operators it does not emit).
MAX_OPSET = 23


def flag(
    default: Any,
    help: str,
    name: str | None = "",
    *,
    negate: bool = False,
    choices: tuple[str, ...] | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
) -> Any:
    """A dataclass field with its command-line flag.

    Args:
        default: The field's default.
        help: The flag's help text.
        name: The flag as click declares it: `""` derives `--field-name` (`--x/--no-x` for a boolean whose
            default is true or None), None makes the field Python-only.
        negate: The flag sets the field to False (`--quiet` for `progress`).
        choices: The values the flag accepts.
        minimum: The smallest integer the flag accepts.
        maximum: The largest integer the flag accepts.
    """
    return field(
        default=default,
        metadata={
            "flag": name,
            "help": help,
            "negate": negate,
            "choices": choices,
            "minimum": minimum,
            "maximum": maximum,
        },
    )


def option_fields(cls: type) -> list[Any]:
    """The fields of an options class that have a command-line flag."""
    return [f for f in fields(cls) if f.metadata.get("flag") is not None]


# Fields several commands share, each built afresh per class (a dataclass field belongs to one class).
def _force() -> Any:
    return flag(False, "Replace an existing output, only once the new one is complete.")


def _fsync() -> Any:
    return flag(False, "Wait until the output is on disk before putting it in place (survives power loss).")


def _allow_pickle() -> Any:
    return flag(
        False, "Read adapter_model.bin with torch.load(weights_only=True) if there is no safetensors."
    )


def _rounding() -> Any:
    return flag(
        Rounding.FMA,
        "CPU rounding to reproduce when regenerating projections: 'separate' for adapters drawn on CPUs without "
        "AVX2.",
        choices=tuple(r.value for r in Rounding),
    )


def _progress() -> Any:
    return flag(True, "No progress bar.", "--quiet", negate=True)


def _device() -> Any:
    return flag("cpu", "Where the fold runs, e.g. cuda (reading and writing stay on the CPU).")


def check_device(device: str) -> None:
    """`device` names a place the fold can run: `cpu`, `cuda` or `cuda:N` (whether it is there is checked when
    the command runs, see `merging.fold_device`)."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (not index.isdigit() or kind == "cpu")):
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N")


def _ignore_record() -> Any:
    return flag(
        False,
        "Merge an adapter the base's vera-export record lists as merged in already, or unmerge one it does not list.",
    )


def _block_rows() -> Any:
    return flag(512, "Rows of a weight folded at a time; bounds the fold's scratch memory.", None)


def _overlap() -> Any:
    return flag(True, "Read the next tensor and write the previous one while the current one folds.", None)


@dataclass(frozen=True)
class MergeOptions:
    """Options of `merge`.

    Attributes:
        verify: Run `verify` on the result (its report becomes `MergeReport.verification`).
        device: Where the fold runs (`"cpu"`, `"cuda"`, `"cuda:1"`); reading and writing stay on the CPU.
        force: Replace a non-empty output directory (only once the new one is complete).
        fsync: Flush the output to disk before putting it in place, so it survives a power loss too.
        allow_pickle: Read `adapter_model.bin` with `torch.load(weights_only=True)` when there is no safetensors.
        rounding: Which CPU kernel's float rounding to reproduce when regenerating projections.
        ignore_record: Merge an adapter the base's record lists already (it would be folded in twice), or, when
            unmerging, subtract one the record does not list.
        progress: Show a progress bar on stderr.
        block_rows: Rows of a weight folded at a time; bounds the fold's scratch memory.
        overlap: Read the next tensor and write the previous one while the current one folds.
    """

    verify: bool = flag(
        False, "Verify the merged checkpoint afterwards; exit 1 if it fails.", "--verify/--no-verify"
    )
    device: str = _device()
    force: bool = _force()
    fsync: bool = _fsync()
    allow_pickle: bool = _allow_pickle()
    rounding: Rounding = _rounding()
    ignore_record: bool = _ignore_record()
    progress: bool = _progress()
    block_rows: int = _block_rows()
    overlap: bool = _overlap()

    def __post_init__(self) -> None:
        check_device(self.device)


@dataclass(frozen=True)
class UnmergeOptions:
    """Options of `unmerge`; the fields mean what they mean for `MergeOptions`."""

    device: str = _device()
    force: bool = _force()
    fsync: bool = _fsync()
    allow_pickle: bool = _allow_pickle()
    rounding: Rounding = _rounding()
    ignore_record: bool = _ignore_record()
    progress: bool = _progress()
    block_rows: int = _block_rows()
    overlap: bool = _overlap()

    def __post_init__(self) -> None:
        check_device(self.device)


@dataclass(frozen=True)
class VerifyOptions:
    """Options of `verify` on a merged checkpoint.

    Attributes:
        full_model: Also compare whole-model outputs; None decides by whether two copies fit in memory.
        allow_pickle: Read `adapter_model.bin` when there is no safetensors file.
        rounding: Which CPU kernel's float rounding to reproduce when regenerating projections.
        progress: Show a progress bar on stderr (and, on the command line, print only failing checks).
    """

    full_model: bool | None = flag(
        None,
        "Compare whole-model outputs too (default: when two copies fit in memory). --merged only.",
        "--full-model/--layers-only",
    )
    allow_pickle: bool = _allow_pickle()
    rounding: Rounding = _rounding()
    progress: bool = flag(True, "Print only failing checks; no progress bar.", "--quiet", negate=True)


@dataclass(frozen=True)
class VerifyOnnxOptions:
    """Options of `verify --onnx` (the projections' rounding is the one recorded at export)."""

    allow_pickle: bool = _allow_pickle()
    progress: bool = flag(True, "Print only failing checks.", "--quiet", negate=True)


@dataclass(frozen=True)
class InspectOptions:
    """Options of `inspect`."""

    allow_pickle: bool = _allow_pickle()


@dataclass(frozen=True)
class OnnxOptions:
    """Options of `onnx`.

    Attributes:
        mode: `"merged"` (adapters folded into the weights), `"adapter"` (one adapter, swappable) or `"bank"`
            (one adapter per batch row, chosen by the `adapter_index` input from tables of all the adapters).
        task: `"auto"` (from `config.json`'s architecture) or one of `ONNX_TASKS`; `"text-generation"` writes
            a package ONNX Runtime GenAI generates from, with a KV cache.
        precision: `"fp32"`, `"fp16"` (weights and compute), or `"int4"` (text-generation only: int4 base weights,
            the VeRA branch in float32).
        opset: ONNX opset of the graph, `MIN_OPSET` to `MAX_OPSET` (text-generation: the model builder's).
        verify: Compare the graph in ONNX Runtime with the unmerged model in PyTorch after exporting.
        external_data: Weights in `model.onnx.data`: True, False, or None for only when over protobuf's 2 GiB.
        force: Replace a non-empty output directory (only once the new one is complete).
        allow_pickle: Read `adapter_model.bin` when there is no safetensors file.
        rounding: Which CPU kernel's float rounding to reproduce when regenerating projections.
        progress: Show the export's stages on a bar on stderr.
    """

    mode: str = flag(
        "merged",
        "merged: adapters folded into the weights; adapter: one adapter kept as swappable graph inputs; bank: "
        "every adapter in one graph, chosen per batch row by the adapter_index input.",
        choices=ONNX_MODES,
    )
    task: str = flag(
        "auto",
        "What the graph returns; auto reads config.json's architecture.",
        choices=("auto", *ONNX_TASKS),
    )
    precision: str = flag(
        "fp32",
        "fp32; fp16 (weights and compute); int4 (text-generation: int4 base weights, the VeRA branch in float).",
        choices=ONNX_PRECISIONS,
    )
    opset: int = flag(MIN_OPSET, "ONNX opset.", minimum=MIN_OPSET, maximum=MAX_OPSET)
    verify: bool = flag(True, "Compare the graph in ONNX Runtime with the unmerged model in PyTorch.")
    external_data: bool | None = flag(
        None, "Weights in model.onnx.data (default: only past 1.75 GiB; protobuf cannot hold 2 GiB)."
    )
    force: bool = _force()
    allow_pickle: bool = _allow_pickle()
    rounding: Rounding = _rounding()
    progress: bool = _progress()

    def __post_init__(self) -> None:
        if self.mode not in ONNX_MODES:
            raise ValueError(f"mode is {self.mode!r}, expected one of {ONNX_MODES}")
        if self.task != "auto" and self.task not in ONNX_TASKS:
            raise ValueError(f"task is {self.task!r}, expected 'auto' or one of {ONNX_TASKS}")
        if self.precision not in ONNX_PRECISIONS:
            raise ValueError(f"precision is {self.precision!r}, expected one of {ONNX_PRECISIONS}")
        if self.precision == "int4" and self.task != "text-generation":
            raise ValueError(
                "precision int4 needs --task text-generation (its int4 kernels are the model builder's)"
            )
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(
                f"opset is {self.opset}, expected {MIN_OPSET} to {MAX_OPSET} (what the exporter supports)"
            )


@dataclass(frozen=True)
class OnnxAdapterOptions:
    """Options of `onnx-adapter`."""

    force: bool = flag(False, "Replace an existing file.")
    allow_pickle: bool = _allow_pickle()


@dataclass(frozen=True)
class ToLoraOptions:
    """Options of `to-lora`.

    Attributes:
        rank: None for the exact export at the adapter's r; K < r for the best rank-K approximation per layer.
        dtype: Dtype of `lora_A` / `lora_B`: `"float32"`, `"bfloat16"` or `"float16"`.
        force, fsync, allow_pickle, rounding, progress: As for `MergeOptions` (the bar counts layers).
    """

    rank: int | None = flag(
        None,
        "Best rank-K approximation of each layer (default: the exact export at the adapter's r).",
        minimum=1,
    )
    dtype: str = flag("float32", "Dtype of lora_A / lora_B.", choices=LORA_DTYPES)
    force: bool = _force()
    fsync: bool = _fsync()
    allow_pickle: bool = _allow_pickle()
    rounding: Rounding = _rounding()
    progress: bool = _progress()

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank}")


@dataclass(frozen=True)
class EmbedOptions:
    """Options of `embed-projections`; the fields mean what they mean for `MergeOptions`."""

    force: bool = _force()
    fsync: bool = _fsync()
    allow_pickle: bool = _allow_pickle()
    rounding: Rounding = _rounding()
