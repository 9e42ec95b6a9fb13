"""A check prints as one line: its verdict, its errors against its tolerance, and what it compared."""

from __future__ import annotations

from vera_export.checks import Check


def test_a_check_is_one_line_with_its_verdict_and_numbers() -> None:
    passed = Check("layer q", 1.5e-3, 2e-4, 4e-3, True, "probes at 0.4 of their tolerance")
    assert passed.line() == (
        "[ok  ] layer q: max abs 0.0015, max rel 0.0002, tolerance 0.004 (probes at 0.4 of their tolerance)"
    )
    assert Check("copied", 0.0, 0.0, 0.0, False).line() == "[FAIL] copied: max abs 0, max rel 0, tolerance 0"
