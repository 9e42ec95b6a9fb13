"""Merge, verify and export PEFT VeRA adapters without PEFT."""

from .adapter import VeraAdapter, VeraConfig, load_adapter
from .errors import (
    AdapterError,
    CheckpointError,
    IncompatibleAdapterError,
    OutputError,
    VeraExportError,
    VeraExportWarning,
)
from .embed import EmbedReport, embed_projections
from .inspection import inspect
from .layers import VeraLinear, apply_vera, merge_into, unmerge_from
from .lora import LoraLayer, LoraReport, to_lora
from .merge import merge, unmerge
from .options import MergeOptions
from .projections import Rounding, generate_projections
from .verify import verify

__all__ = [
    "AdapterError",
    "CheckpointError",
    "EmbedReport",
    "IncompatibleAdapterError",
    "LoraLayer",
    "LoraReport",
    "MergeOptions",
    "OutputError",
    "Rounding",
    "VeraAdapter",
    "VeraConfig",
    "VeraExportError",
    "VeraExportWarning",
    "VeraLinear",
    "apply_vera",
    "embed_projections",
    "generate_projections",
    "inspect",
    "load_adapter",
    "merge",
    "merge_into",
    "to_lora",
    "unmerge",
    "unmerge_from",
    "verify",
]
