"""One check of a verification: what was compared, how far off it was, against what tolerance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Check:
    """One comparison: what, how far off, against what tolerance."""

    name: str
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    passed: bool
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        return (
            f"[{mark}] {self.name}: max abs {self.max_abs_error:.3g}, max rel {self.max_rel_error:.3g}, "
            f"tolerance {self.tolerance:.3g}{f' ({self.detail})' if self.detail else ''}"
        )


@dataclass(frozen=True)
class Comparison:
    """Outputs against a reference that may not be finite everywhere (a base holding NaN, or a model whose
    reference computes NaN on a padded row): where the reference is not finite the outputs must hold the same
    values (NaN where it is NaN, the same infinity), and elsewhere they are compared in numbers.

    Attributes:
        error: Largest |got - want| where `want` is finite (0 where it is nowhere).
        scale: Largest |want| there (1.0 if that is 0 or there is none).
        nonfinite: How many reference values are not finite.
        same: Whether the outputs hold the same non-finite values there.
    """

    error: float
    scale: float
    nonfinite: int
    same: bool

    @classmethod
    def of(cls, got: np.ndarray, want: np.ndarray) -> Comparison:
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        finite = np.isfinite(want)
        same = bool(((got == want) | (np.isnan(got) & np.isnan(want)))[~finite].all())
        error = float(np.abs(got[finite] - want[finite]).max()) if finite.any() else 0.0
        scale = float(np.abs(want)[finite].max()) if finite.any() else 0.0
        return cls(error, scale or 1.0, int((~finite).sum()), same)

    def detail(self) -> str:
        """The non-finite reference values and whether the outputs hold them too (for `same`)."""
        if not self.nonfinite:
            return ""
        verdict = "the same" if self.same else "NOT the same"
        return f"{self.nonfinite} reference outputs not finite, {verdict} here"

    def uncompared(self) -> str:
        """The non-finite reference values, left out (where `same` is not asked for)."""
        return (
            f"{self.nonfinite} outputs not compared: the reference is not finite there"
            if self.nonfinite
            else ""
        )
