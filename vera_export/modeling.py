"""Load a Hugging Face model directory with transformers, by the architecture its `config.json` names."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers

from .errors import CheckpointError


def model_class(model_dir: Path) -> type[transformers.PreTrainedModel]:
    """The transformers class named by `config.json`'s `architectures`."""
    config_path = model_dir / "config.json"
    try:
        architectures = json.loads(config_path.read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{config_path}: cannot be read ({exc}); a Hugging Face model needs its config.json"
        ) from None
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise CheckpointError(
            f"{config_path}: architectures {architectures} names no class this transformers "
            f"{transformers.__version__} knows; model outputs cannot be computed"
        )
    return cls


def model_config(model_dir: Path) -> transformers.PretrainedConfig:
    """The model's config, as its architecture's class reads `config.json`."""
    return model_class(model_dir).config_class.from_pretrained(model_dir)


def tied_partners(model_dir: Path, names: Iterable[str]) -> dict[str, list[str]]:
    """For each of `names` that the model ties to other parameters (tied word embeddings), those parameters' names.

    Builds the model from `config.json` on the meta device: no weights are read or allocated.
    """
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = model_class(model_dir)(config)
    groups: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        groups[id(param)].append(name)
    group_of = {name: group for group in groups.values() for name in group}
    return {
        name: [n for n in group_of[name] if n != name] for name in names if len(group_of.get(name, [])) > 1
    }


def load_model(model_dir: Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The model in `dtype`, in eval mode, without a KV cache."""
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # our own progress bar is the only one
    try:
        model = model_class(model_dir).from_pretrained(model_dir, dtype=dtype)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model.config.use_cache = False
    return model.eval()


def model_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`logits` when the model has a head, else `last_hidden_state`."""
    output = model(**batch)
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is not None:
            return {key: value}
    raise CheckpointError(f"{type(model).__name__} returns neither logits nor last_hidden_state")
