"""One check of a verification: what was compared, how far off it was, against what tolerance."""

from __future__ import annotations

from dataclasses import dataclass


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
