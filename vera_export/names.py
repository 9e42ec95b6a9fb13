"""Which checkpoint tensor each parameter of the model is: a tied pair stored once, keys transformers renames.

Adapters name modules as the model built by transformers names them; the checkpoint may not store a tensor under
each of those names:

- **Tied word embeddings.** A model with `tie_word_embeddings` computes its output head with the input embedding's
  weight, and its checkpoint stores the pair once (`model.embed_tokens.weight`). PEFT's forward changes one side
  only: a VeRA `lm_head` adds its delta to the head's output, a `modules_to_save` copy of `embed_tokens` replaces
  the input side. A merged checkpoint that computes what that forward computes stores both tensors and says they
  are no longer tied. (PEFT's own `merge_and_unload` folds a tied head's delta into the shared tensor, which
  changes the input embedding too; it warns that this "can lead to complications".)
- **Renamed keys.** transformers 5 renames some checkpoints' keys when it loads them (ViT's
  `encoder.layer.0.attention.attention.query` is the model's `layers.0.attention.q_proj`), by its own conversion
  mapping; the merge writes the checkpoint's keys, folded, so the output loads as the base does.

Both are asked of transformers, on a model built on the meta device, and only when an adapter names a tensor the
checkpoint does not store, or one that can be tied: an adapter of plain linear layers costs nothing here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .adapter import VeraAdapter
from .errors import CheckpointError
from .io.index import ShardedTensorIndex
from .io.model_config import CONFIG_NAME, read_model_config
from .plan import Plan

TIE_KEY = "tie_word_embeddings"


@dataclass(frozen=True)
class ModelNames:
    """The base's tensors under the model's names, and the way back to the checkpoint's.

    Attributes:
        index: The base's tensors as the model names them, for planning: a tied pair stored once listed under both
            names, renamed keys under the model's name (`ShardedTensorIndex.with_aliases`, `renamed`).
        output: The tensors a merged checkpoint holds, under the checkpoint's names: the base's, with both sides of
            each tied pair the adapters untie.
        aliases: Each tied tensor the checkpoint does not store -> the stored tensor whose bytes it reads.
        renames: Model name -> checkpoint key, for keys transformers renames on load.
        tied: Each adapted or replaced tensor that the model ties to others -> those others.
    """

    index: ShardedTensorIndex
    output: ShardedTensorIndex
    aliases: dict[str, str] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)
    tied: dict[str, list[str]] = field(default_factory=dict)

    def to_checkpoint(self, plan: Plan, keep_ties: bool = False) -> Plan:
        """`plan` with its tensors named by the checkpoint's keys; with `keep_ties` (unmerging a checkpoint PEFT
        merged, which holds a tied head's delta in the shared tensor) a tied alias's delta goes to the stored
        tensor."""
        ties = {a: self.renames.get(s, s) for a, s in self.aliases.items()} if keep_ties else {}
        back = {**self.renames, **ties}
        if not back:
            return plan

        def keyed(tensors: dict) -> dict:
            return {back.get(name, name): value for name, value in tensors.items()}

        return dataclasses.replace(
            plan,
            deltas=keyed(plan.deltas),
            replacements=keyed(plan.replacements),
            base_copies=keyed(plan.base_copies),
        )

    def notes(self) -> list[str]:
        """What the user should know about a merged output: it stores a tied pair twice."""
        return [
            f"{name} is tied to {', '.join(partners)} in the base; the output stores both, untied "
            f"({TIE_KEY}: false), so that it computes what the unmerged adapter computes"
            for name, partners in self.tied.items()
        ]


def model_names(source: Path, index: ShardedTensorIndex, adapters: Sequence[VeraAdapter]) -> ModelNames:
    """How the tensors the adapters name are stored in the base at `source` (indexed as `index`)."""
    # Embedding-like layers (PEFT saves them whole: base_copies) and replaced tensors may be tied, unless the
    # config says nothing is.
    tieable = {n for a in adapters for n in (*a.replacements, *a.base_copies)}
    missing = (tieable | {f"{m}.weight" for a in adapters for m in a.layers}) - index.tensors.keys()
    candidates = missing | (tieable if _may_tie(source) else set())
    if not candidates:
        return ModelNames(index, index)
    from .modeling import (  # transformers takes seconds to import
        checkpoint_renames,
        meta_model,
        tied_partners,
    )

    try:
        model = meta_model(source)
    except CheckpointError:
        return ModelNames(index, index)  # an architecture transformers does not know renames and ties nothing
    renames = checkpoint_renames(model, index.tensors) if missing else {}
    planned = index.renamed({key: name for name, key in renames.items()})
    tied = tied_partners(model, sorted(candidates))
    aliases = {}
    for name, partners in tied.items():
        group = [name, *partners]
        stored = [n for n in group if n in planned.tensors]
        if stored:
            aliases.update({n: stored[0] for n in group if n not in planned.tensors})
    output = index.with_aliases({renames.get(a, a): renames.get(s, s) for a, s in aliases.items()})
    return ModelNames(planned.with_aliases(aliases), output, aliases, renames, tied)


def _may_tie(model_dir: Path) -> bool:
    """False when config.json says `tie_word_embeddings: false` and no sub-config says otherwise."""
    raw = read_model_config(model_dir) or {}
    nested = [v.get(TIE_KEY) for v in raw.values() if isinstance(v, dict) and TIE_KEY in v]
    return raw.get(TIE_KEY) is not False or any(flag is not False for flag in nested)


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
