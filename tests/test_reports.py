"""Reports as JSON: `to_json` gives strict JSON for every value a report holds, and `envelope` wraps a report, an
error or a failed check in the one shape every command prints, with its exit code."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from vera_export.checks import Check
from vera_export.errors import CheckpointError
from vera_export.options import Rounding
from vera_export.reports import (
    ENVELOPE_VERSION,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_OK,
    JsonFields,
    duration,
    envelope,
    message,
    to_json,
)
from vera_export.verification import VerifyReport


@dataclass
class Inner:
    shape: tuple[int, ...]
    rounding: Rounding


@dataclass
class Report(JsonFields):
    path: Path
    inner: Inner
    names: set[str]
    error: float
    scores: dict[int, float]
    secret: str = field(default="not for JSON", repr=False)
    ok: bool = True
    warnings: list[str] = field(default_factory=list)
    command = "demo"
    json_properties = ("doubled",)

    @property
    def doubled(self) -> float:
        return 2 * self.error

    def text(self, quiet: bool = False) -> str:
        return "demo"


def _report(**changes) -> Report:
    values = dict(
        path=Path("/out/merged"),
        inner=Inner((2, 3), Rounding.SEPARATE),
        names={"b", "a"},
        error=0.5,
        scores={1: math.inf, 2: -math.inf, 3: math.nan, 4: 0.25},
    )
    return Report(**{**values, **changes})


def test_to_json_gives_plain_json_for_every_value_a_report_holds() -> None:
    data = to_json(_report(warnings=["w"]))
    assert data == {
        "path": "/out/merged",
        "inner": {"shape": [2, 3], "rounding": "separate"},
        "names": ["a", "b"],  # sorted: a set has no order of its own
        "error": 0.5,
        "scores": {"1": None, "2": None, "3": None, "4": 0.25},  # strict JSON has no NaN or infinity
        "ok": True,
        "warnings": ["w"],
        "doubled": 1.0,  # a json_property
    }
    json.dumps(data, allow_nan=False)  # strict JSON


def test_to_json_of_scalars_paths_and_containers() -> None:
    assert to_json(PurePosixPath("a/b")) == "a/b" and to_json(frozenset({3, 1})) == [1, 3]
    assert to_json((1, (2.0, None), [True])) == [1, [2.0, None], [True]]
    assert to_json(float("nan")) is None and to_json(-0.0) == 0.0 and to_json("x") == "x"


@pytest.mark.parametrize("value", [object(), b"bytes", 1j, Inner])
def test_to_json_refuses_what_has_no_json_form(value: object) -> None:
    with pytest.raises(TypeError, match="has no JSON form"):
        to_json(value)


def test_the_envelope_of_a_report() -> None:
    report = _report(warnings=["from the report"])
    result = envelope("demo", report, warnings=["raised while it ran"])
    assert result["version"] == ENVELOPE_VERSION and result["command"] == "demo"
    assert (result["ok"], result["exit_code"], result["error"]) == (True, EXIT_OK, None)
    assert result["warnings"] == ["raised while it ran", "from the report"]
    assert "warnings" not in result["result"] and "command" not in result["result"]
    assert result["result"]["doubled"] == 1.0
    json.dumps(result, allow_nan=False)


def test_the_envelope_of_a_failed_check_is_exit_1_with_its_result() -> None:
    check = Check("layer q_proj", 1.5, math.inf, 0.25, passed=False, detail="4 ulp off")
    report = VerifyReport(checks=[check])
    result = envelope("verify", report)
    assert (result["ok"], result["exit_code"], result["error"]) == (False, EXIT_FAILED, None)
    assert result["result"]["passed"] is False and result["result"]["checks"] == [
        {
            "name": "layer q_proj",
            "max_abs_error": 1.5,
            "max_rel_error": None,
            "tolerance": 0.25,
            "passed": False,
            "detail": "4 ulp off",
        }
    ]


def test_the_envelope_of_an_error_is_exit_2_without_a_result() -> None:
    error = CheckpointError("base/model.safetensors: truncated; re-download it")
    result = envelope("merge", error=error, warnings=["first"])
    assert (result["ok"], result["exit_code"], result["result"]) == (False, EXIT_ERROR, None)
    assert result["error"] == {
        "type": "CheckpointError",
        "message": "base/model.safetensors: truncated; re-download it",
    }
    assert result["warnings"] == ["first"]
    assert envelope("merge")["exit_code"] == EXIT_ERROR  # no report and no error: it did not get that far


def test_an_explicit_exit_code_wins() -> None:
    result = envelope("merge", error=KeyboardInterrupt(), exit_code=130)
    assert (result["ok"], result["exit_code"]) == (False, 130)
    assert result["error"] == {"type": "KeyboardInterrupt", "message": "KeyboardInterrupt"}
    assert envelope("inspect", _report(), exit_code=EXIT_OK)["ok"] is True


def test_message_is_one_line() -> None:
    assert message(ValueError("a\n  b\tc\x1b[2J  ")) == "a\\n  b\\tc\\x1b[2J"
    assert message(ValueError("x" * 5000)) == "x" * 2000 + "... (3000 more characters)"
    assert message(RuntimeError()) == "RuntimeError"


def test_every_report_class_renders_as_json() -> None:
    """The reports the commands return, with their fields at defaults: `to_json` handles every field type."""
    from vera_export.embed import EmbedReport
    from vera_export.lora import LoraLayer, LoraReport
    from vera_export.merging import MergeReport

    reports = [
        MergeReport("merge", Path("out"), ["a"], verification=VerifyReport()),
        EmbedReport(Path("out"), (8, 64), (64, 8), "fma", "bfloat16"),
        LoraReport(Path("out"), 4, "float32", False, [LoraLayer("q", 4, 0.5, 1e-8)]),
        VerifyReport(checks=[Check("c", 0.0, 0.0, 0.0, True)]),
    ]
    for report in reports:
        data = to_json(report)
        json.dumps(data, allow_nan=False)
        shown = {f.name for f in dataclasses.fields(report) if f.repr}
        assert shown | set(getattr(report, "json_properties", ())) == data.keys(), type(report).__name__


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0, "0 ms"), (0.042, "42 ms"), (0.1, "0.1 s"), (12.34, "12.3 s")]
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text
