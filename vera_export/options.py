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
