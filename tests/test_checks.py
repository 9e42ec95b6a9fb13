"""A check prints as one line: its verdict, its errors against its tolerance, and what it compared."""

from __future__ import annotations

import numpy as np

from vera_export.checks import Check, Comparison


def test_a_check_is_one_line_with_its_verdict_and_numbers() -> None:
    passed = Check("layer q", 1.5e-3, 2e-4, 4e-3, True, "probes at 0.4 of their tolerance")
    assert passed.line() == (
        "[ok  ] layer q: max abs 0.0015, max rel 0.0002, tolerance 0.004 (probes at 0.4 of their tolerance)"
    )
    assert Check("copied", 0.0, 0.0, 0.0, False).line() == "[FAIL] copied: max abs 0, max rel 0, tolerance 0"


def test_a_comparison_takes_the_reference_s_non_finite_values_position_by_position() -> None:
    nan, inf = float("nan"), float("inf")
    want = np.array([1.0, -4.0, nan, inf])
    same = Comparison.of(np.array([1.5, -4.0, nan, inf]), want)
    assert (same.error, same.scale, same.nonfinite, same.same) == (0.5, 4.0, 2, True)
    assert same.detail() == "2 reference outputs not finite, the same here"
    moved = Comparison.of(np.array([1.0, -4.0, 0.0, inf]), want)
    assert not moved.same and "NOT the same" in moved.detail()
    assert moved.uncompared() == "2 outputs not compared: the reference is not finite there"
    # A NaN where the reference is finite is an error no tolerance passes.
    assert np.isnan(Comparison.of(np.array([nan, -4.0, nan, inf]), want).error)
    finite = Comparison.of(np.zeros(3), np.zeros(3))
    assert (finite.scale, finite.detail(), finite.uncompared()) == (1.0, "", "")
    nothing = Comparison.of(np.array([nan]), np.array([nan]))
    assert (nothing.error, nothing.scale, nothing.same) == (0.0, 1.0, True)
