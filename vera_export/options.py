"""Options shared by the CLI and the Python API."""

from __future__ import annotations

from dataclasses import dataclass

from .projections import Rounding


@dataclass(frozen=True)
class MergeOptions:
    """How a checkpoint is rewritten.

    Attributes:
        device: Where the fold runs (`"cpu"`, `"cuda"`, `"cuda:1"`); reading and writing stay on the CPU.
        block_rows: Rows of a weight folded at a time; bounds the fold's scratch memory.
        force: Replace a non-empty output directory (only once the new one is complete).
        allow_pickle: Read `adapter_model.bin` with `torch.load(weights_only=True)` when there is no safetensors.
        rounding: Which CPU kernel's float rounding to reproduce when regenerating projections.
        progress: Show a progress bar on stderr.
        fsync: Wait until the output is on disk before putting it in place, so it also survives a power loss
            (costs the disk's write time; without it the output survives any crash of the process itself).
        overlap: Read the next tensor and write the previous one while the current one folds.
    """

    device: str = "cpu"
    block_rows: int = 512
    force: bool = False
    allow_pickle: bool = False
    rounding: Rounding = Rounding.FMA
    progress: bool = True
    fsync: bool = False
    overlap: bool = True


# Task -> (graph output, architecture suffixes it applies to). Feature extraction runs any model's base model.
TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "causal-lm": ("logits", ("ForCausalLM", "LMHeadModel")),
    "sequence-classification": ("logits", ("ForSequenceClassification",)),
    "feature-extraction": ("last_hidden_state", ("Model",)),
}
MODES = ("merged", "adapter", "bank")
MIN_OPSET = 18
# The newest opset the exporter's output passes onnx.checker with here (24 and up use operators it does not emit).
MAX_OPSET = 23


@dataclass(frozen=True)
class OnnxOptions:
    """How a model is exported.

    Attributes:
        mode: `"merged"` (adapters folded into the weights), `"adapter"` (one adapter, swappable) or `"bank"`
            (one adapter per batch row, chosen by the `adapter_index` input from tables of all the adapters).
        task: `"auto"` (from `config.json`'s architecture) or one of `TASKS`.
        opset: ONNX opset of the graph, 18 to 23.
        verify: Compare the graph in ONNX Runtime with the unmerged model in PyTorch after exporting.
        external_data: Weights in `model.onnx.data`: True, False, or None for only when over protobuf's 2 GiB.
        force: Replace a non-empty output directory (only once the new one is complete).
        allow_pickle: Read `adapter_model.bin` with `torch.load(weights_only=True)` when there is no safetensors.
        rounding: Which CPU kernel's float rounding to reproduce when regenerating projections.
        progress: Show the export's stages on a bar on stderr.
    """

    mode: str = "merged"
    task: str = "auto"
    opset: int = MIN_OPSET
    verify: bool = True
    external_data: bool | None = None
    force: bool = False
    allow_pickle: bool = False
    rounding: Rounding = Rounding.FMA
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode is {self.mode!r}, expected one of {MODES}")
        if self.task != "auto" and self.task not in TASKS:
            raise ValueError(f"task is {self.task!r}, expected 'auto' or one of {tuple(TASKS)}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(
                f"opset is {self.opset}, expected {MIN_OPSET} to {MAX_OPSET} (what the exporter supports)"
            )
