"""What every command returns: a typed report that renders itself as text and as JSON, in one envelope.

Every command's `--json` output is the same envelope (documented in `docs/json.md`, schema in
`docs/envelope.schema.json`):

    {"command": "merge", "ok": true, "exit_code": 0, "result": {...}, "warnings": [...], "error": null}

`result` is the report's fields as JSON (`to_json`), `error` is `{"type": ..., "message": ...}` when the command
failed before it could report (then `result` is null). This module imports neither torch nor ONNX.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any, ClassVar, Protocol

from .errors import one_line

ENVELOPE_VERSION = 1
EXIT_OK = 0
EXIT_FAILED = 1  # verification ran and failed, or inspect --base found a misfit
EXIT_ERROR = 2  # bad input or unusable output: one line on stderr, no traceback


class Report(Protocol):
    """What a command returns.

    Attributes:
        command: The command's name as the CLI spells it (`merge`, `onnx-adapter`, ...).
        warnings: Things the user should know that did not stop the work.
    """

    command: str
    warnings: list[str]

    @property
    def ok(self) -> bool:
        """False when a check failed (the CLI exits 1)."""
        ...

    def text(self, quiet: bool = False) -> str:
        """What the CLI prints on stdout; `quiet` keeps only what needs attention."""
        ...


class JsonFields:
    """Mixin for report dataclasses: properties listed in `json_properties` are part of their JSON too."""

    json_properties: ClassVar[tuple[str, ...]] = ()


def to_json(value: Any) -> Any:
    """`value` as JSON-compatible data: dataclasses as objects (their fields, less those with `repr=False`, plus
    their `json_properties`), paths as strings, enums as their values, tuples and sets as lists, and non-finite
    floats as null (strict JSON has no NaN)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
        for name in getattr(value, "json_properties", ()):
            data[name] = to_json(getattr(value, name))
        return data
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [to_json(v) for v in items]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{type(value).__name__} has no JSON form")


def envelope(
    command: str,
    report: Report | None = None,
    error: BaseException | None = None,
    exit_code: int | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON envelope of one command's run: its report, or the error that stopped it.

    Args:
        command: The command's name.
        report: What the command returned, if it got that far.
        error: What stopped it, if anything did.
        exit_code: The process's exit code; derived from `report` / `error` when None.
        warnings: Warnings raised while it ran, besides the report's own.
    """
    if exit_code is None:
        exit_code = (
            EXIT_ERROR if error is not None or report is None else (EXIT_OK if report.ok else EXIT_FAILED)
        )
    result = None
    if report is not None:
        result = to_json(report)
        result.pop("command", None)
        result.pop("warnings", None)
        warnings = [*warnings, *report.warnings]
    return {
        "version": ENVELOPE_VERSION,
        "command": command,
        "ok": exit_code == EXIT_OK,
        "exit_code": exit_code,
        "result": result,
        "warnings": list(warnings),
        "error": None if error is None else {"type": type(error).__name__, "message": message(error)},
    }


def message(error: BaseException) -> str:
    """An error's message as one bounded line (see `errors.one_line`)."""
    return one_line(str(error) or type(error).__name__)


def duration(seconds: float) -> str:
    """`12.3 s`, or `40 ms` below a tenth of a second (where `0.0 s` would say nothing)."""
    return f"{seconds:.1f} s" if seconds >= 0.1 else f"{seconds * 1000:.0f} ms"
