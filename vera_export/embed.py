"""Embed the projections an adapter omits (`save_projection=False`), so it loads the same anywhere.

Without stored projections, PEFT redraws `vera_A` / `vera_B` from `projection_prng_key` when it loads the adapter,
and what it draws depends on the base (the projections' shapes), on the base's dtype (PEFT rounds them to a 16-bit
base's dtype) and on the CPU (see `projections.Rounding`). `embed_projections` fixes them once: it writes a copy of
the adapter with `base_model.vera_A` / `base_model.vera_B` as PEFT would hold them for this base, and with
`save_projection` set to true.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .adapter import PICKLE_WEIGHTS_NAME, PROJECTION_KEYS, WEIGHTS_NAME, VeraAdapter, load_adapter
from .config import CONFIG_NAME
from .errors import AdapterError
from .io.index import ShardedTensorIndex
from .io.locations import Kind, locate
from .io.outputs import staged_output
from .io.side_files import side_files
from .io.writer import save_tensors
from .names import model_names
from .options import EmbedOptions
from .plan import resolve_projections
from .targets import match_layers


@dataclass
class EmbedReport:
    """What `embed_projections` wrote."""

    output: Path
    vera_A_shape: tuple[int, int]
    vera_B_shape: tuple[int, int]
    rounding: str
    base_dtype: str
    warnings: list[str] = field(default_factory=list)
    command = "embed-projections"
    ok = True

    def text(self, quiet: bool = False) -> str:
        """What `vera-export embed-projections` prints."""
        return (
            f"wrote {self.output} with vera_A {list(self.vera_A_shape)} and vera_B {list(self.vera_B_shape)} "
            f"embedded (regenerated for a {self.base_dtype} base, {self.rounding} rounding); save_projection is "
            f"now true"
        )


def embed_projections(
    base: str | Path,
    adapter: str | Path | VeraAdapter,
    output: str | Path,
    options: EmbedOptions = EmbedOptions(),
) -> EmbedReport:
    """Write a copy of an adapter saved with `save_projection=False`, with its projections embedded.

    The projections are regenerated as PEFT does for `base` (shapes from its targeted layers, rounded to its dtype
    when that is 16-bit, CPU rounding from `options.rounding`) and stored in float32. Every other tensor and every
    other file of the adapter is copied unchanged; `adapter_config.json` gets `"save_projection": true`. The
    result is tied to this base's shapes and dtype, as the original is once loaded.

    Args:
        base: The base model directory the adapter is used with; only its safetensors headers are read.
        adapter: PEFT VeRA adapter directory, or an adapter loaded with `load_adapter`.
        output: Directory to create; written in full or not at all.
        options: See `EmbedOptions`.

    Raises:
        AdapterError: The adapter already stores its projections (there is nothing to embed), or is invalid.
        IncompatibleAdapterError, OutputError: See the message.
    """
    base, output = locate(base, Kind.BASE), Path(output)
    vera = load_adapter(adapter, options.allow_pickle)
    if vera.vera_A is not None:
        raise AdapterError(
            f"{vera.path}: already stores base_model.vera_A / base_model.vera_B; there is nothing to embed, and the "
            f"adapter loads the same anywhere as it is"
        )
    tensors = model_names(base, ShardedTensorIndex.from_dir(base), [vera]).index.tensors
    layers = match_layers(vera, {name: tuple(info.shape) for name, info in tensors.items()})
    projections = resolve_projections(vera, tensors, layers, options.rounding)
    stored = {**vera.tensors, PROJECTION_KEYS["vera_A"]: projections.vera_A}
    stored[PROJECTION_KEYS["vera_B"]] = projections.vera_B
    rewritten = [vera.path / name for name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)]
    side = side_files(vera.path, rewritten, skip_weights=False)  # README, tokenizer, ...: checked up front
    with staged_output(output, [base, vera.path], options.force, options.fsync) as staging:
        side.copy(staging)
        config = {**vera.raw_config, "save_projection": True}
        (staging / CONFIG_NAME).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        save_tensors(staging / WEIGHTS_NAME, stored, {"format": "pt"}, options.fsync)
    base_dtype = tensors[next(iter(layers.values())).weight].dtype
    return EmbedReport(
        output,
        tuple(projections.vera_A.shape),
        tuple(projections.vera_B.shape),
        options.rounding.value,
        str(base_dtype).removeprefix("torch."),
    )
