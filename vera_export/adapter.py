"""Read a PEFT VeRA adapter directory: `adapter_config.json` and its tensors, without PEFT.

The checkpoint layout (PEFT's `get_peft_model_state_dict` for VeRA, adapter name removed):

- `base_model.model.<module>.vera_lambda_b` (out_features) and `.vera_lambda_d` (r) per targeted module;
- `base_model.vera_A` (r, max_in) and `base_model.vera_B` (max_out, r) when `save_projection` is true;
- every other `base_model.model.<name>` replaces the base tensor `<name>` once `.base_layer` (or
  `.modules_to_save`) is dropped from it: trained biases (`bias="vera_only"` or `"all"`) and `modules_to_save`
  copies such as a classifier head. With `bias="all"`, PEFT also saves the frozen `.original_module.` copy of a
  `modules_to_save` module's bias, which holds the base's own values and is skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterError
from .safetensors_io import ShardedTensorIndex, load_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

_MODEL_PREFIX = "base_model.model."
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}
_BIAS_CHOICES = ("none", "all", "vera_only")


@dataclass(frozen=True)
class VeraConfig:
    """The fields of `adapter_config.json` that decide what the adapter computes."""

    r: int
    target_modules: tuple[str, ...] | str
    projection_prng_key: int = 0
    save_projection: bool = True
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    @classmethod
    def from_json(cls, path: Path) -> VeraConfig:
        """Parse and validate an `adapter_config.json`, raising `AdapterError` that names the field."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AdapterError(
                f"{path.parent}: no {CONFIG_NAME}; point --adapter at a PEFT adapter directory"
            ) from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise AdapterError(
                f"{path}: not a readable JSON file ({exc}); re-save the adapter with PEFT"
            ) from None
        if not isinstance(raw, dict):
            raise AdapterError(f"{path}: expected a JSON object, found {type(raw).__name__}")

        peft_type = raw.get("peft_type")
        if peft_type != "VERA":
            raise AdapterError(
                f"{path}: peft_type is {peft_type!r}, expected 'VERA'; vera-export only handles VeRA adapters"
            )
        fields = _ConfigFields(path, raw)
        config = cls(
            r=fields.positive_int("r", 256),
            target_modules=fields.target_modules(),
            projection_prng_key=fields.int("projection_prng_key", 0),
            save_projection=fields.bool("save_projection", True),
            fan_in_fan_out=fields.bool("fan_in_fan_out", False),
            bias=fields.choice("bias", _BIAS_CHOICES, "none"),
            modules_to_save=tuple(dict.fromkeys(fields.str_list("modules_to_save") or ())),
            layers_to_transform=fields.layers_to_transform(),
            layers_pattern=fields.str_list("layers_pattern")
            if raw.get("layers_pattern")
            else None,  # PEFT: "", [] = none
            task_type=fields.optional_str("task_type"),
            base_model_name_or_path=fields.optional_str("base_model_name_or_path"),
        )
        # PEFT matches these as regular expressions; a malformed one must fail here, not mid-merge.
        patterns = (
            [("target_modules", config.target_modules)] if isinstance(config.target_modules, str) else []
        )
        patterns += [("modules_to_save", rf"(^|.*\.){m}($|\..*)") for m in config.modules_to_save]
        patterns += [
            ("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in config.layers_pattern or ()
        ]
        for key, pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as exc:
                raise AdapterError(
                    f"{path}: field {key!r} is not a valid regular expression ({exc})"
                ) from None
        return config


@dataclass(frozen=True)
class VeraLayer:
    """The trained vectors of one targeted module."""

    module: str
    lambda_b: torch.Tensor
    lambda_d: torch.Tensor


@dataclass
class VeraAdapter:
    """A loaded VeRA adapter: config, per-layer lambdas, stored projections and tensors that replace the base's.

    Attributes:
        path: The adapter directory.
        config: The parsed `adapter_config.json`.
        layers: Trained vectors by module path in the base model (e.g. `model.layers.0.self_attn.q_proj`).
        vera_A: The stored projection (r, max_in), or None when the checkpoint does not carry it.
        vera_B: The stored projection (max_out, r), or None.
        replacements: Base tensor name -> trained tensor (biases, `modules_to_save`), in the adapter's dtype.
        warnings: Things worth telling the user that do not stop a merge.
    """

    path: Path
    config: VeraConfig
    layers: dict[str, VeraLayer]
    vera_A: torch.Tensor | None
    vera_B: torch.Tensor | None
    replacements: dict[str, torch.Tensor]
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def num_trainable_parameters(self) -> int:
        """Lambdas plus replaced tensors: what training updated."""
        vectors = sum(layer.lambda_b.numel() + layer.lambda_d.numel() for layer in self.layers.values())
        return vectors + sum(t.numel() for t in self.replacements.values())


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
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(
            f"{path}: adapter directory does not exist; point --adapter at a PEFT adapter directory"
        )
    config = VeraConfig.from_json(path / CONFIG_NAME)
    tensors = read_adapter_tensors(path, allow_pickle)
    return _assemble(path, config, tensors)


def read_adapter_tensors(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter directory under its checkpoint key (safetensors, or pickle if allowed)."""
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        return load_tensors(ShardedTensorIndex.from_file(weights))
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
        raise AdapterError(f"{pickled}: cannot be loaded safely ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterError(f"{pickled}: expected a dict of tensors")
    return state


def _assemble(path: Path, config: VeraConfig, tensors: dict[str, torch.Tensor]) -> VeraAdapter:
    file = path / WEIGHTS_NAME
    problems: list[str] = []
    lambdas: dict[str, dict[str, torch.Tensor]] = {}
    projections: dict[str, torch.Tensor] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        projection = next((name for name, k in PROJECTION_KEYS.items() if key == k), None)
        if projection is not None:
            projections[projection] = _as_float32(tensor)
        elif not key.startswith(_MODEL_PREFIX):
            problems.append(f"unexpected tensor {key!r}")
        elif key.endswith((".vera_lambda_b", ".vera_lambda_d")):
            module, _, kind = key[len(_MODEL_PREFIX) :].rpartition(".")
            lambdas.setdefault(module, {})[kind.removeprefix("vera_")] = tensor
        elif ".original_module." in key:
            continue  # PEFT's frozen copy of a modules_to_save module (saved with bias="all"): the base's own values
        else:
            base_name = (
                key[len(_MODEL_PREFIX) :].replace(".base_layer.", ".").replace(".modules_to_save.", ".")
            )
            replacements[base_name] = tensor

    layers: dict[str, VeraLayer] = {}
    for module, pair in lambdas.items():
        missing = {"lambda_b", "lambda_d"} - pair.keys()
        if missing:
            problems.append(f"module {module!r} has no vera_{missing.pop()}")
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
    return VeraAdapter(path, config, layers, vera_A, vera_B, replacements, notes)


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """PEFT holds lambdas and projections in float32 parameters and buffers, so other float dtypes load rounded
    (float64) or widened (16-bit) to float32; the fold's exactness rests on it."""
    return tensor.float() if tensor.is_floating_point() else tensor


class _ConfigFields:
    """Typed access to `adapter_config.json` fields with errors that name the field."""

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path, self.raw = path, raw

    def _fail(self, key: str, expected: str) -> AdapterError:
        return AdapterError(f"{self.path}: field {key!r} is {self.raw[key]!r}, expected {expected}")

    def int(self, key: str, default: int) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, "an integer")
        return value

    def positive_int(self, key: str, default: int) -> int:
        value = self.int(key, default)
        if value <= 0:
            raise self._fail(key, "a positive integer")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.raw.get(key, default)
        if value not in choices:
            raise self._fail(key, " or ".join(repr(c) for c in choices))
        return value

    def optional_str(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, str):
            raise self._fail(key, "a string or null")
        return value

    def str_list(self, key: str) -> tuple[str, ...] | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, "a list of strings")
        return tuple(value)

    def target_modules(self) -> tuple[str, ...] | str:
        value = self.raw.get("target_modules")
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return tuple(sorted(set(value)))
        if value is None or value == []:
            raise AdapterError(f"{self.path}: 'target_modules' is missing; the adapter config is incomplete")
        raise self._fail("target_modules", "a regex string or a list of module names")

    def layers_to_transform(self) -> tuple[int, ...] | int | None:
        value = self.raw.get("layers_to_transform")
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise self._fail("layers_to_transform", "an integer, a list of integers or null")
