"""`adapter_config.json` of a VeRA adapter: read, and validated field by field, as PEFT's `VeraConfig` would be."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

from .errors import AdapterError, quoted

CONFIG_NAME = "adapter_config.json"
_BIAS_CHOICES = ("none", "all", "vera_only")


def read_config(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, every field as written.

    Raises:
        AdapterError: The file is missing, unreadable, not JSON or not an object.
    """
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
    return raw


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
        return cls.from_raw(path, read_config(path))

    @classmethod
    def from_raw(cls, path: Path, raw: dict[str, Any]) -> VeraConfig:
        """Validate the fields of `raw`, read from `path` (named in errors)."""
        peft_type = raw.get("peft_type")
        if peft_type != "VERA":
            raise AdapterError(
                f"{path}: peft_type is {quoted(peft_type)}, expected 'VERA'; vera-export only handles VeRA adapters"
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
                regex.compile(pattern)  # as `targets` matches them, bounded in time
            except (regex.error, RecursionError, OverflowError, ValueError) as exc:
                raise AdapterError(
                    f"{path}: field {quoted(key)} is not a valid regular expression ({exc})"
                ) from None
        return config


class _ConfigFields:
    """Typed access to `adapter_config.json` fields with errors that name the field."""

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path, self.raw = path, raw

    def _fail(self, key: str, expected: str) -> AdapterError:
        return AdapterError(
            f"{self.path}: field {quoted(key)} is {quoted(self.raw[key])}, expected {expected}"
        )

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
