"""Embed the projections an adapter omits (`save_projection=False`), so it loads the same anywhere.

Without stored projections, PEFT redraws `vera_A` / `vera_B` from `projection_prng_key` when it loads the adapter,
and what it draws depends on the base (the projections' shapes), on the base's dtype (PEFT rounds them to a 16-bit
base's dtype) and on the CPU (see `projections.Rounding`). `embed_projections` fixes them once: it writes a copy of
the adapter with `base_model.vera_A` / `base_model.vera_B` as PEFT would hold them for this base, and with
`save_projection` set to true.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .adapter import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    PROJECTION_KEYS,
    WEIGHTS_NAME,
    VeraAdapter,
    load_adapter,
    read_adapter_tensors,
)
from .errors import AdapterError
from .options import MergeOptions
from .outputs import staged_output
from .plan import resolve_projections
from .safetensors_io import ShardedTensorIndex
from .safetensors_writer import save_tensors
from .targets import match_layers


@dataclass(frozen=True)
class EmbedReport:
    """What `embed_projections` wrote."""

    output: Path
    vera_A_shape: tuple[int, int]
    vera_B_shape: tuple[int, int]
    rounding: str
    base_dtype: str

    def text(self) -> str:
        """What `vera-export embed-projections` prints."""
        return (
            f"wrote {self.output} with vera_A {list(self.vera_A_shape)} and vera_B {list(self.vera_B_shape)} embedded "
            f"(regenerated for a {self.base_dtype} base, {self.rounding} rounding); save_projection is now true"
        )

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "vera_A": list(self.vera_A_shape),
            "vera_B": list(self.vera_B_shape),
            "rounding": self.rounding,
            "base_dtype": self.base_dtype,
        }


def embed_projections(
    base: str | Path,
    adapter: str | Path | VeraAdapter,
    output: str | Path,
    options: MergeOptions = MergeOptions(),
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
        options: `force`, `fsync`, `allow_pickle` and `rounding` are used.

    Raises:
        AdapterError: The adapter already stores its projections (there is nothing to embed), or is invalid.
        IncompatibleAdapterError, OutputError: See the message.
    """
    vera = load_adapter(adapter, options.allow_pickle)
    if vera.vera_A is not None:
        raise AdapterError(
            f"{vera.path}: already stores base_model.vera_A / base_model.vera_B; there is nothing to embed, and the "
            f"adapter loads the same anywhere as it is"
        )
    base, output = Path(base), Path(output)
    tensors = ShardedTensorIndex.from_dir(base).tensors
    layers = match_layers(vera, {name: tuple(info.shape) for name, info in tensors.items()})
    projections = resolve_projections(vera, tensors, layers, options.rounding)
    stored = read_adapter_tensors(vera.path, options.allow_pickle)
    stored.update(
        {PROJECTION_KEYS["vera_A"]: projections.vera_A, PROJECTION_KEYS["vera_B"]: projections.vera_B}
    )
    with staged_output(output, [base, vera.path], options.force, options.fsync) as staging:
        _copy_other_files(vera.path, staging)
        config = json.loads((vera.path / CONFIG_NAME).read_text(encoding="utf-8"))
        config["save_projection"] = True
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


def _copy_other_files(adapter_dir: Path, staging: Path) -> None:
    """The adapter's other files (README, tokenizer, ...); its config and weights are rewritten."""
    rewritten = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME}
    for path in sorted(adapter_dir.rglob("*")):
        relative = path.relative_to(adapter_dir)
        if path.is_dir() or str(relative) in rewritten:
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
