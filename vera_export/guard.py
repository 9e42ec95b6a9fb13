"""The fold's cancellation guard: which elements of `W + delta_W` the compute precision cannot vouch for, and
their repair in float64 or exact arithmetic. See `CancellationGuard`; `fold.fold` drives it block by block."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

import torch

from .precision import SIGNIFICAND_BITS, exact_sums, gamma, narrow

if TYPE_CHECKING:
    from .fold import VeraDelta

# Elements repaired at a time: bounds the gathered factor rows to _CHUNK * r float64 values each.
_CHUNK = 4096
# Past one candidate in _DENSE elements of a block, the block is recomputed with one float64 product instead.
_DENSE = 256
# Elements of a row `inspect` tests together: one minimum each, so only segments with a suspect are looked into.
_SEGMENT = 64
# `fold_wide`'s row test on float32 roundings: their relative error (2**-24 where normal), and the test's own.
_SINGLE_SLACK = 1 - 2.0**-22
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


class CancellationGuard:
    """Finds the elements whose computed sum may be more than 1 ulp (of the output dtype) off, and fixes them.

    With unit roundoff `u` of the compute dtype, `k` terms and exact factors `l`, `r`, the computed product
    (factors rounded to the compute dtype, products accumulated in any order) is within `gamma_{k+2} S` of exact,
    where `S = sum_k |l_k r_k| <= ||l_i|| ||r_j||`, and adding the weight rounds once more, by at most
    `u |y| / (1 - u)`. Rounding the sum `y` to a dtype with `p` significand bits is within 1 ulp of exact whenever
    the error is at most `m |y|` with `m = 2**-(p + 1)`. So an element can need repair only if
    `|y_ij| < K ||l_i|| ||r_j||` with `K = gamma_{k+2} / (m - 2u)`: one product with the columns' reciprocal norms
    and one minimum per segment of a row find out, and only the segments that hold a suspect are looked into. The
    norms come from the projections' squares, shared by every layer (`VeraDelta.squared_norms`). Those elements are
    recomputed in float64 from the exact factors (built once per weight, the first time one is needed: `(rows +
    cols) * k` float64 values) and, where even that cannot vouch for the result, exactly.
    """

    def __init__(
        self,
        out_dtype: torch.dtype,
        dtype: torch.dtype,
        left: torch.Tensor,
        right: torch.Tensor,
        deltas: Sequence[VeraDelta],
        alpha: float,
    ) -> None:
        k = left.shape[1]
        self.margin = 2.0 ** -(SIGNIFICAND_BITS[out_dtype] + 1)
        self.out_dtype = out_dtype
        # Sums at least this large round to infinity in the output dtype. A delta smaller than half the spacing
        # of the largest values cannot get there from a finite weight, so then the check is skipped.
        info = torch.finfo(out_dtype)
        half_spacing = info.eps * 2.0 ** (math.floor(math.log2(info.max)) - 1)
        self.overflow = info.max + half_spacing
        u = torch.finfo(dtype).eps / 2
        # 1 + 2**-10 on top: the tests themselves are computed in the compute dtype.
        self.error_scale = gamma(k + 2, dtype) * (1 + 2.0**-10)
        if out_dtype == dtype:
            # Float64 weights: nothing wider to compute in, so the sum is the result and its own rounding is the
            # output's. Elements whose product error could reach half an ulp are recomputed exactly: most of them
            # when the delta is not small next to the weight, which is correct but slow.
            self.scale = self.error_scale / (self.margin * (1 - 2.0**-10))
        else:
            self.scale = self.error_scale / (self.margin - 2 * u)
        self.overflow_limit = self.overflow * (1 - 8 * u)
        self.gamma64 = gamma(k + 2, torch.float64)
        self.exact_compute = dtype == torch.float64
        self.deltas, self.alpha = deltas, alpha
        # Norms of the exact factors, from the projections' squares (in float64, where squares of float32 values
        # neither underflow nor overflow), nudged up by far more than the float64 rounding of forming them
        # (`VeraDelta.squared_norms`, one more sum per extra adapter, the square root), so the bound never comes
        # out too small.
        nudge = 1 + 2 * gamma(k + 2, dtype)
        row_squares, col_squares = zip(*(delta.squared_norms() for delta in deltas))
        self.row_norms = _total(row_squares).sqrt_() * nudge
        self.col_norms = _total(col_squares).sqrt_() * nudge
        self.row_norms_c, self.col_norms_c = self.row_norms.to(dtype), self.col_norms.to(dtype)
        # The test `|y_ij| / c_j < scale * r_i` (the bound, divided by the column's norm): one product with a
        # vector and one reduction per segment. Each side is rounded at most twice, far inside the 2**-10 slack in
        # `error_scale`; a zero column (no delta there) has an infinite reciprocal and never becomes a suspect.
        self.inverse_col_norms_c = (1 / self.col_norms).to(dtype)
        self.thresholds_c = (self.scale * self.row_norms).to(dtype)
        largest_delta = (
            (self.row_norms.max() * self.col_norms.max()).item() if left.numel() and right.numel() else 0.0
        )
        self.may_overflow = largest_delta >= half_spacing
        self.suspects: list[
            tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ] = []  # (rows, cols, weight values)
        self.rows, self.cols = left.shape[0], right.shape[1]
        # `inspect` looks for suspects segment by segment: the largest divisor of a row up to _SEGMENT elements.
        self.segment = next(
            size for size in range(min(_SEGMENT, max(1, self.cols)), 0, -1) if self.cols % size == 0
        )
        # Set once a block had too many suspects: the rest of the weight is folded in float64 (`fold_wide`).
        self.wide = False
        self._right_wide: torch.Tensor | None = None
        self._left: torch.Tensor | None = None
        self._right: torch.Tensor | None = None
        self._factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _exact_left(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `rows` of the exact float64 `left`, shape (len(rows), k); all of them (built once) when None."""
        if rows is not None:
            return _signed(_joined([delta.left_rows(rows) for delta in self.deltas]), self.alpha)
        if self._left is None:  # from the factors themselves: no gather, no copy for a single adapter
            self._left = _signed(_joined([left for left, _ in self._exact_factors()]), self.alpha)
        return self._left

    def _exact_right(self, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Columns `columns` of the exact float64 `right`, as rows: shape (len(columns), k), contiguous to gather
        per suspect; all of them (built once) when None."""
        if columns is not None:
            return _joined([delta.right_columns(columns) for delta in self.deltas])
        if self._right is None:
            self._right = _joined([right.T for _, right in self._exact_factors()]).contiguous()
        return self._right

    def _exact_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each delta's exact float64 `(left, right)`, formed once for both sides."""
        if self._factors is None:
            self._factors = [delta.factors(torch.float64) for delta in self.deltas]
        return self._factors

    def inspect(self, block: torch.Tensor, weight: torch.Tensor, start: int, scratch: torch.Tensor) -> bool:
        """Note the elements of one computed block that may need repair (a few passes over the block).

        Returns False, and switches the guard to `wide`, when the block has so many suspects (a delta as large as
        the weights) that folding it in float64 is cheaper: the caller then folds it with `fold_wide`.
        """
        if block.numel() == 0:
            return True
        stop = start + len(block)
        if self.may_overflow:
            torch.abs(block, out=scratch)
            # Cheap first: the block's largest sum plus the largest error bound; NaN falls through to the full check.
            row_norms = self.row_norms_c[start:stop]
            if not (
                scratch.amax() + self.error_scale * row_norms.amax() * self.col_norms_c.amax()
                < self.overflow_limit
            ):
                self._note_near_overflow(scratch, row_norms, weight, start)
        torch.mul(block, self.inverse_col_norms_c, out=scratch).abs_()
        thresholds = self.thresholds_c[start:stop]
        # Suspects are rare and scattered: find the row segments that hold one first, then look only there. A NaN
        # (from a NaN weight) makes its segment's minimum NaN, which must not hide the segment's other elements.
        segments = scratch.view(len(block), -1, self.segment)
        minima = segments.amin(dim=2)
        hits = ((minima < thresholds[:, None]) | minima.isnan()).nonzero()
        if hits.numel() == 0:
            return True
        rows, groups = hits.unbind(1)
        where = (segments[rows, groups] < thresholds[rows, None]).nonzero()
        hit, offset = where.unbind(1)
        i, j = rows[hit], groups[hit] * self.segment + offset
        if not self.exact_compute and i.numel() > block.numel() // _DENSE:
            self.wide = True
            return False
        self.suspects.append((start + i, j, weight[i, j].double()))
        return True

    def fold_wide(self, weight: torch.Tensor, start: int, out: torch.Tensor) -> None:
        """Fold rows `start:` of a 16-bit weight in float64, from the exact factors, into `out`.

        The product of exact float64 factors plus the weight is within `gamma64 (|w| + ||l_i|| ||r_j||)` of exact
        in any summation order (the weight counts as one more term, so one `addmm_` forms the sum), so wherever
        that is at most `m |y|` the sum rounds (`narrow`, once) to within 1 ulp; the float32 guard's cancellation
        bound shrinks by 2**29, so next to no element is left for `repair`. Rows are tested first from their
        extremes, on the float32 rounding `s` that `narrow` starts from: where `s` is normal, `|y| >= |s| / (1 +
        2**-24)`, and `_SINGLE_SLACK` leaves room for that and for the test's own roundings. The rows that fail
        are tested element by element in float64. Rows go `2**20 / cols` at a time, bounding the buffers.
        """
        if self._right_wide is None:
            self._right_wide = self._exact_right().T.contiguous()
        left, right = self._exact_left(), self._right_wide
        step = max(1, 2**20 // max(1, self.cols))
        shape = (min(step, len(weight)), self.cols)
        buffer = torch.empty(shape, dtype=torch.float64, device=weight.device)
        rounded = torch.empty(shape, dtype=torch.float32, device=weight.device)
        magnitudes = torch.empty_like(rounded)
        largest_col_norm = self.col_norms.amax()
        for offset in range(0, len(weight), step):
            first = start + offset
            stored = weight[offset : offset + step]
            n = len(stored)
            y = buffer[:n].copy_(stored).addmm_(left[first : first + n], right)
            single = rounded[:n].copy_(y)
            single_magnitudes = torch.abs(single, out=magnitudes[:n])
            row_norms = self.row_norms[first : first + n]
            bound = self.gamma64 * (stored.abs().amax(dim=1).double() + row_norms * largest_col_norm)
            minima = single_magnitudes.amin(dim=1).double()
            fine = (bound <= self.margin * _SINGLE_SLACK * minima) & (minima >= _FLOAT32_TINY)
            rows = (~fine).nonzero().flatten()
            if self.may_overflow:
                high = single_magnitudes.amax(dim=1).double() >= self.overflow_limit
                rows = torch.cat([rows, high.nonzero().flatten()])
            if rows.numel():
                rows = rows.unique()
                w, sums = stored[rows].double(), y[rows].abs()
                bound = self.gamma64 * (w.abs() + row_norms[rows, None] * self.col_norms)
                unsafe = ~(bound <= self.margin * sums)
                if self.may_overflow:
                    unsafe |= sums >= self.overflow_limit
                unsafe &= torch.isfinite(w)  # NaN and Inf stay where they are, as in `inspect`
                where = unsafe.nonzero()
                i, j = rows[where[:, 0]], where[:, 1]
                if i.numel():
                    self.suspects.append((first + i, j, w[where[:, 0], j]))
            narrow(y, out.dtype, single=single, out=out[offset : offset + n])

    def _note_near_overflow(
        self, magnitudes: torch.Tensor, row_norms: torch.Tensor, weight: torch.Tensor, start: int
    ) -> None:
        """Note the elements whose sum may round to infinity (or is not finite) where the weight is finite.

        The computed sum is within `gamma_{k+2} S + u |y|` of exact, so below the limit with that added it cannot
        overflow; the others are decided from their recomputed value in `repair`.
        """
        bound = torch.addr(magnitudes, row_norms, self.col_norms_c, alpha=self.error_scale)
        near = ~(bound < self.overflow_limit) & torch.isfinite(weight)
        if near.any():
            i, j = near.nonzero().unbind(1)
            self.suspects.append((start + i, j, weight[i, j].double()))

    def repair(self, out: torch.Tensor) -> None:
        """Recompute every noted element from exact factors, rounding straight from float64 (or exact) into `out`."""
        if not self.suspects:
            return
        i, j, w = (torch.cat(parts) for parts in zip(*self.suspects))
        # Gathering from the whole exact factors beats building each suspect's row and column once there are
        # about as many suspects as rows and columns.
        whole = len(i) > (self.rows + self.cols) // 2
        for ci, cj, cw in zip(i.split(_CHUNK), j.split(_CHUNK), w.split(_CHUNK)):
            if whole:
                left, right = self._exact_left()[ci], self._exact_right()[cj]
            else:
                left, right = self._exact_left(ci), self._exact_right(cj)
            if not self.exact_compute:
                # Row-by-row dot products, in any order: `_safe`'s bound holds for every summation order.
                recomputed = torch.einsum("nk,nk->n", left, right).add_(cw)
                safe = self._safe(ci, cj, cw, recomputed)
                kept = safe.nonzero().squeeze(1)
                self._write(out, ci[kept], cj[kept], recomputed[kept], cw[kept], left, right, kept)
                unsafe = ~safe
                ci, cj, cw, left, right = ci[unsafe], cj[unsafe], cw[unsafe], left[unsafe], right[unsafe]
            if ci.numel():
                self._write(out, ci, cj, exact_sums(cw, left, right), cw, left, right)

    def _write(
        self,
        out: torch.Tensor,
        i: torch.Tensor,
        j: torch.Tensor,
        sums: torch.Tensor,
        w: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> None:
        """`out[i, j] = sums` (float64, correctly rounded or exact) rounded once to `out`'s dtype.

        A sum that rounds to infinity (its weight is finite) may be a float64 rounding of an exact sum just below
        the overflow threshold: that is decided in exact arithmetic, from `w` and the exact factor rows `left`,
        `right` (row `rows[n]` of them for element n, when given: they are gathered only for such elements), and
        the element is the dtype's largest value; past the threshold the fold is refused.
        """
        rounded = narrow(sums, out.dtype)
        for n in (~torch.isfinite(rounded)).nonzero().flatten().tolist():
            row = n if rows is None else int(rows[n])
            exact = Fraction(float(w[n])) + sum(
                Fraction(a) * Fraction(b) for a, b in zip(left[row].tolist(), right[row].tolist())
            )
            if abs(exact) >= Fraction(self.overflow):
                raise FloatingPointError(f"overflows {out.dtype} at row {int(i[n])}, column {int(j[n])}")
            rounded[n] = math.copysign(torch.finfo(out.dtype).max, exact)
        out[i.to(out.device), j.to(out.device)] = rounded.to(out.device)  # a CUDA fold may write a CPU `out`

    def _safe(
        self, i: torch.Tensor, j: torch.Tensor, w: torch.Tensor, recomputed: torch.Tensor
    ) -> torch.Tensor:
        """Whether float64 vouches for each recomputed element (same test, with float64's error bound)."""
        bound = self.gamma64 * (w.abs() + self.row_norms[i] * self.col_norms[j])
        return bound <= self.margin * recomputed.abs()


def _total(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of several adapters' squared norms (each a tensor of its own, free to change in place)."""
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(dim=0)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Several adapters' factor columns side by side; one adapter's as they are."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _signed(tensor: torch.Tensor, alpha: float) -> torch.Tensor:
    """`alpha * tensor`, exact (alpha is +-1), without a pass when alpha is 1."""
    return tensor if alpha == 1 else tensor * alpha
