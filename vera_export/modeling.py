"""Load a Hugging Face model directory with transformers, by the architecture its `config.json` names."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import transformers

from .errors import CheckpointError, quoted
from .io.model_config import CONFIG_NAME, read_model_config

# What transformers raises for a config or checkpoint it cannot use: the input's fault, told in one line.
_TRANSFORMERS_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError)


def model_class(model_dir: Path) -> type[transformers.PreTrainedModel]:
    """The transformers class named by `config.json`'s `architectures`.

    Raises:
        CheckpointError: No or a broken config.json, or an architecture this transformers does not know.
    """
    config_path = model_dir / CONFIG_NAME
    raw = read_model_config(model_dir)
    if raw is None:
        raise CheckpointError(f"{config_path}: not found; a Hugging Face model needs its config.json")
    architectures = raw.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise CheckpointError(
            f"{config_path}: architectures {quoted(architectures)} names no model class this transformers "
            f"{transformers.__version__} knows; model outputs cannot be computed"
        )
    return cls


def model_config(model_dir: Path) -> transformers.PretrainedConfig:
    """The model's config, as its architecture's class reads `config.json`.

    Raises:
        CheckpointError: transformers cannot read it.
    """
    cls = model_class(model_dir)
    with _as_checkpoint_errors(model_dir):
        return cls.config_class.from_pretrained(model_dir)


@contextlib.contextmanager
def _as_checkpoint_errors(model_dir: Path) -> Iterator[None]:
    try:
        yield
    except _TRANSFORMERS_ERRORS as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{model_dir}: transformers cannot load it ({type(exc).__name__}: {quoted(reason, 300, repr_=False)}); "
            f"check its config.json and weights"
        ) from exc


def meta_model(model_dir: Path) -> transformers.PreTrainedModel:
    """The model built from `config.json` on the meta device: its modules and parameter names, no weights read or
    allocated."""
    cls = model_class(model_dir)
    with _as_checkpoint_errors(model_dir), torch.device("meta"):
        return cls(cls.config_class.from_pretrained(model_dir))


def tied_partners(model: transformers.PreTrainedModel, names: Iterable[str]) -> dict[str, list[str]]:
    """For each of `names` that the model ties to other parameters (tied word embeddings), those parameters' names."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        groups[id(param)].append(name)
    group_of = {name: group for group in groups.values() for name in group}
    return {
        name: [n for n in group_of[name] if n != name] for name in names if len(group_of.get(name, [])) > 1
    }


def checkpoint_renames(model: transformers.PreTrainedModel, keys: Iterable[str]) -> dict[str, str]:
    """The checkpoint keys among `keys` that transformers renames when it loads them (its conversion mapping: a
    ViT checkpoint's `attention.attention.query` is the model's `attention.q_proj`), by the model's name.

    Keys transformers converts rather than renames (fused mixture-of-experts weights, several tensors into one)
    are left out: they are no one parameter of the model.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            apply_converters,
            apply_renamings,
        )
    except ImportError:  # a transformers without conversion mappings stores every key as the model names it
        return {}
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    renames = {}
    for key in keys:
        if converters and apply_converters(key, converters)[1] is not None:
            continue
        renamed = apply_renamings(key, renamings)
        if renamed != key:
            renames[renamed] = key
    return renames


def load_model(model_dir: Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The model in `dtype`, in eval mode, without a KV cache."""
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # our own progress bar is the only one
    cls = model_class(model_dir)
    try:
        with _as_checkpoint_errors(model_dir):
            # Mixture-of-experts layers run expert by expert: the fused kernels have no float64.
            model = cls.from_pretrained(model_dir, dtype=dtype, experts_implementation="eager")
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
