"""Tied tensors that an adapter unties: a tied word embedding whose head is adapted, or whose input side is trained.

A model with `tie_word_embeddings` computes its output head with the input embedding's weight, and its checkpoint
stores the pair once (`model.embed_tokens.weight`). PEFT's forward changes one side only: a VeRA `lm_head` adds its
delta to the head's output, a `modules_to_save` copy of `embed_tokens` replaces the input side. A merged checkpoint
that computes what that forward computes must therefore store both tensors and say they are no longer tied.

(PEFT's own `merge_and_unload` folds an adapted tied head into the shared tensor, which changes the input embedding
too; it warns that this "can lead to complications". The merge here keeps the adapter's meaning instead.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .adapter import VeraAdapter
from .errors import CheckpointError
from .io.index import ShardedTensorIndex
from .io.model_config import CONFIG_NAME, read_model_config

TIE_KEY = "tie_word_embeddings"


@dataclass(frozen=True)
class Untying:
    """The base's tensors as the adapters need them, and the ties they break.

    Attributes:
        index: The base's index, with each tensor the checkpoint stores once for a tied pair also listed under its
            partner's name (`ShardedTensorIndex.with_aliases`), so that the pair can be written as two tensors.
        aliases: Name added -> the stored tensor whose bytes it reads.
        tied: Each adapted or replaced tensor that the model ties to others -> those others.
    """

    index: ShardedTensorIndex
    aliases: dict[str, str] = field(default_factory=dict)
    tied: dict[str, list[str]] = field(default_factory=dict)

    def notes(self) -> list[str]:
        """What the user should know about the output: it stores the tied pair twice."""
        return [
            f"{name} is tied to {', '.join(partners)} in the base; the output stores both, untied "
            f"({TIE_KEY}: false), so that it computes what the unmerged adapter computes"
            for name, partners in self.tied.items()
        ]


def untie(source: Path, index: ShardedTensorIndex, adapters: Sequence[VeraAdapter]) -> Untying:
    """Find the tied tensors the adapters adapt or replace in the base at `source` (indexed as `index`).

    Only tensors that can be tied are looked up (weights a target module lacks in the checkpoint, an embedding-like
    layer PEFT saves whole, `modules_to_save` copies), and only then is the model built, on the meta device, to ask
    transformers what it ties: an adapter of plain linear layers costs nothing here.
    """
    missing = {f"{m}.weight" for a in adapters for m in a.layers} - index.tensors.keys()
    candidates = missing | {n for a in adapters for n in (*a.replacements, *a.base_copies)}
    if not candidates:
        return Untying(index)
    from .modeling import tied_partners  # transformers takes seconds to import

    try:
        tied = tied_partners(source, sorted(candidates))
    except CheckpointError:
        return Untying(
            index
        )  # an architecture transformers does not know ties nothing when it is loaded either
    aliases = {}
    for name, partners in tied.items():
        group = [name, *partners]
        stored = [n for n in group if n in index.tensors]
        if stored:
            aliases.update({n: stored[0] for n in group if n not in index.tensors})
    return Untying(index.with_aliases(aliases), aliases, tied)


def write_untied_config(model_dir: Path) -> None:
    """Set `tie_word_embeddings` false in `model_dir`'s config.json, and in every sub-config that has the flag
    (a multimodal model's `text_config`), so that transformers loads both tensors instead of tying them again."""
    raw = read_model_config(model_dir)
    if raw is None:
        return
    raw[TIE_KEY] = False
    for value in raw.values():
        if isinstance(value, dict) and TIE_KEY in value:
            value[TIE_KEY] = False
    (model_dir / CONFIG_NAME).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
