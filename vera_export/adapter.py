"""Read a PEFT VeRA adapter directory, its config (see `config`) and its tensors, without PEFT.

The checkpoint layout (PEFT's `get_peft_model_state_dict` for VeRA, adapter name removed):

- `base_model.model.<module>.vera_lambda_b` (out_features) and `.vera_lambda_d` (r) per targeted module;
- `base_model.vera_A` (r, max_in) and `base_model.vera_B` (max_out, r) when `save_projection` is true;
- every other `base_model.model.<name>` replaces the base tensor `<name>` once `.base_layer` (or
  `.modules_to_save`) is dropped from it: trained biases (`bias="vera_only"` or `"all"`) and `modules_to_save`
  copies such as a classifier head. With `bias="all"`, PEFT also saves the frozen `.original_module.` copy of a
  `modules_to_save` module's bias, which holds the base's own values and is skipped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_NAME, VeraConfig, read_config
from .errors import AdapterError, quoted
from .io.index import ShardedTensorIndex
from .io.loader import load_tensors
from .io.locations import Kind, locate

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

_MODEL_PREFIX = "base_model.model."
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


@dataclass(frozen=True)
class VeraLayer:
    """The trained vectors of one targeted module."""

    module: str
    lambda_b: torch.Tensor
    lambda_d: torch.Tensor


@dataclass(eq=False)  # an adapter is itself: compared and hashed by identity, whatever its path
class VeraAdapter:
    """A loaded VeRA adapter: what it computes, and everything read from its directory.

    Later steps need nothing else: nothing re-reads an adapter once it is loaded.

    Attributes:
        path: The adapter directory.
        config: The parsed `adapter_config.json`.
        layers: Trained vectors by module path in the base model (e.g. `model.layers.0.self_attn.q_proj`).
        vera_A: The stored projection (r, max_in), or None when the checkpoint does not carry it.
        vera_B: The stored projection (max_out, r), or None.
        replacements: Base tensor name -> trained tensor (biases, `modules_to_save`), in the adapter's dtype.
        base_copies: Base weight name -> the copy of an adapted layer's own base weight PEFT saves for
            embedding-like layers (`lm_head.base_layer.weight`): frozen, so it must equal the base's.
        raw_config: `adapter_config.json` as read, every field included.
        tensors: Every tensor of the checkpoint under its key and in its dtype, as stored.
        weights_file: The file the tensors were read from.
        warnings: Things worth telling the user that do not stop a merge.
    """

    path: Path
    config: VeraConfig
    layers: dict[str, VeraLayer]
    vera_A: torch.Tensor | None
    vera_B: torch.Tensor | None
    replacements: dict[str, torch.Tensor]
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    raw_config: dict[str, Any] = field(default_factory=dict, repr=False)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    weights_file: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def num_trainable_parameters(self) -> int:
        """Lambdas plus replaced tensors: what training updated."""
        vectors = sum(layer.lambda_b.numel() + layer.lambda_d.numel() for layer in self.layers.values())
        return vectors + sum(t.numel() for t in self.replacements.values())

    def with_projections(self, vera_A: torch.Tensor, vera_B: torch.Tensor) -> VeraAdapter:
        """A copy that holds `vera_A` / `vera_B` as if they were stored (see `plan.pin_projections`)."""
        return dataclasses.replace(self, vera_A=vera_A, vera_B=vera_B)


def load_adapter(path: str | Path | VeraAdapter, allow_pickle: bool = False) -> VeraAdapter:
    """Load a PEFT VeRA adapter directory; an adapter already loaded is returned as it is.

    Args:
        path: Directory with `adapter_config.json` and `adapter_model.safetensors`, or a loaded adapter.
        allow_pickle: Read `adapter_model.bin` with `torch.load(weights_only=True)` when there is no safetensors
            file. Off by default: a pickle from elsewhere is not trusted.

    Raises:
        AdapterError: The directory, its config or its tensors are not a valid VeRA adapter.
    """
    if isinstance(path, VeraAdapter):
        return path
    path = locate(path, Kind.ADAPTER, allow_pickle)
    raw_config = read_config(path / CONFIG_NAME)
    config = VeraConfig.from_raw(path / CONFIG_NAME, raw_config)
    weights_file, tensors = read_adapter_tensors(path, allow_pickle)
    return _assemble(path, config, raw_config, weights_file, tensors)


def read_adapter_tensors(path: Path, allow_pickle: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file of an adapter directory and every tensor in it under its checkpoint key (safetensors,
    or pickle if allowed)."""
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        return weights, load_tensors(ShardedTensorIndex.from_file(weights))
    pickled = path / PICKLE_WEIGHTS_NAME
    if not pickled.is_file():
        raise AdapterError(f"{path}: no {WEIGHTS_NAME}; the adapter directory is incomplete")
    if not allow_pickle:
        raise AdapterError(
            f"{pickled}: adapter weights are a pickle file, which can run code when loaded; convert it to "
            f"{WEIGHTS_NAME} or pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
    try:
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or unsafe pickle
        raise AdapterError(
            f"{pickled}: refused by torch.load(weights_only=True) ({_pickle_reason(exc)}); a pickle that holds more "
            f"than tensors can run code when loaded, so never load it without weights_only: re-save the adapter "
            f"as {WEIGHTS_NAME} where it was trained"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterError(f"{pickled}: expected a dict of tensors")
    return pickled, state


def _pickle_reason(exc: Exception) -> str:
    """What torch found wrong, without its advice to retry with `weights_only=False` (the unsafe thing)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and "trusted source" not in line]
    reason = useful[0] if useful else type(exc).__name__
    return quoted(reason, 200, repr_=False)


def _assemble(
    path: Path, config: VeraConfig, raw_config: dict[str, Any], file: Path, tensors: dict[str, torch.Tensor]
) -> VeraAdapter:
    problems: list[str] = []
    lambdas: dict[str, dict[str, torch.Tensor]] = {}
    projections: dict[str, torch.Tensor] = {}
    replacements: dict[str, torch.Tensor] = {}
    saved: set[str] = set()  # the keys behind `replacements`, without the prefix
    for key, tensor in tensors.items():
        projection = next((name for name, k in PROJECTION_KEYS.items() if key == k), None)
        if projection is not None:
            projections[projection] = _as_float32(tensor)
        elif not key.startswith(_MODEL_PREFIX):
            problems.append(f"unexpected tensor {quoted(key)}")
        elif key.endswith((".vera_lambda_b", ".vera_lambda_d")):
            module, _, kind = key[len(_MODEL_PREFIX) :].rpartition(".")
            lambdas.setdefault(module, {})[kind.removeprefix("vera_")] = tensor
        elif ".original_module." in key:
            continue  # PEFT's frozen copy of a modules_to_save module (saved with bias="all"): the base's own values
        else:
            saved.add(key[len(_MODEL_PREFIX) :])
            base_name = (
                key[len(_MODEL_PREFIX) :].replace(".base_layer.", ".").replace(".modules_to_save.", ".")
            )
            replacements[base_name] = tensor

    layers: dict[str, VeraLayer] = {}
    for module, pair in lambdas.items():
        missing = {"lambda_b", "lambda_d"} - pair.keys()
        if missing:
            problems.append(f"module {quoted(module)} has no vera_{missing.pop()}")
            continue
        lambda_b, lambda_d = pair["lambda_b"], pair["lambda_d"]
        if lambda_b.ndim != 1 or lambda_d.ndim != 1:
            problems.append(
                f"{module}: lambdas must be vectors, found shapes {list(lambda_b.shape)} and {list(lambda_d.shape)}"
            )
        elif lambda_d.numel() != config.r:
            problems.append(f"{module}.vera_lambda_d has length {lambda_d.numel()} but r is {config.r}")
        layers[module] = VeraLayer(module, _as_float32(lambda_b), _as_float32(lambda_d))
    if not layers:
        problems.append("no vera_lambda_b / vera_lambda_d tensors")

    vera_A, vera_B = projections.get("vera_A"), projections.get("vera_B")
    notes: list[str] = []
    if (vera_A is None) != (vera_B is None):
        problems.append(f"only one of {', '.join(PROJECTION_KEYS.values())} is present")
    elif vera_A is not None:
        if vera_A.ndim != 2 or vera_A.shape[0] != config.r:
            problems.append(
                f"base_model.vera_A has shape {list(vera_A.shape)}, expected [r={config.r}, max_in]"
            )
        if vera_B.ndim != 2 or vera_B.shape[1] != config.r:
            problems.append(
                f"base_model.vera_B has shape {list(vera_B.shape)}, expected [max_out, r={config.r}]"
            )
        if not config.save_projection:
            notes.append(
                "save_projection is false but vera_A / vera_B are stored; using the stored projections"
            )
    elif config.save_projection:
        problems.append(
            "save_projection is true but base_model.vera_A / base_model.vera_B are missing; the checkpoint is "
            "incomplete (re-save it, or set save_projection to false in adapter_config.json to regenerate them "
            "from projection_prng_key)"
        )

    for name, tensor in [
        *projections.items(),
        *((f"{m}.lambda_b", layer.lambda_b) for m, layer in layers.items()),
        *((f"{m}.lambda_d", layer.lambda_d) for m, layer in layers.items()),
    ]:
        if not tensor.is_floating_point():
            problems.append(f"{name} has dtype {tensor.dtype}, expected a floating point dtype")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{name} contains NaN or Inf; the adapter is broken")

    if problems:
        raise AdapterError(f"{file}: " + "; ".join(problems))
    # PEFT saves embedding-like adapted layers (lm_head) whole: `<module>.base_layer.weight` is the layer's frozen
    # base weight, not a trained replacement.
    base_copies = {
        name: replacements.pop(name)
        for name in list(replacements)
        if name.removesuffix(".weight") in layers
        and f"{name.removesuffix('.weight')}.base_layer.weight" in saved
    }
    return VeraAdapter(
        path, config, layers, vera_A, vera_B, replacements, base_copies, raw_config, tensors, file, notes
    )


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """PEFT holds lambdas and projections in float32 parameters and buffers, so other float dtypes load rounded
    (float64) or widened (16-bit) to float32; the fold's exactness rests on it."""
    return tensor.float() if tensor.is_floating_point() else tensor
