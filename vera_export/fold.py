"""The fold: `W + delta_W` for one weight, rounded once, to within 1 ulp of the exact sum, always.

For a layer with `in_features` inputs and `out_features` outputs, VeRA's weight change is

    delta_W = diag(lambda_b) @ vera_B[:out, :] @ diag(lambda_d) @ vera_A[:, :in]

(transposed when the weight is stored `[in, out]`; see `VeraDelta`). It is a rank-r product `left @ right` with
`left = lambda_b * vera_B` and `right = lambda_d * vera_A`; several adapters on one layer are one product of
concatenated factors, so any number of adapters costs a single rounding.

Precision rule. The product is formed in float32 for 16-bit weights and in float64 for float32 weights, the
weight is added in that precision, and the sum is rounded to the weight's dtype once. That is within 1 ulp of the
exact sum wherever the sum does not cancel to far below its terms; where it does (an element of `W` close to
`-delta_W`), the compute precision's own error can exceed the result's ulp. Those elements are found with a
rigorous error bound and recomputed: in float64, and where even that could be off, exactly (error-free products
and `math.fsum`). So the guarantee holds for every element, for three cheap passes over each block and a handful
of recomputed elements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Precision the fold runs in, by weight dtype.
_COMPUTE_DTYPES = {
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
    torch.float32: torch.float64,
    torch.float64: torch.float64,
}
_SIGNIFICAND_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}
# Elements repaired at a time: bounds the gathered factor rows to _CHUNK * r float64 values each.
_CHUNK = 4096
# Past one candidate in _DENSE elements of a block, the block is recomputed with one float64 product instead.
_DENSE = 256


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight of `weight_dtype` is folded in: float32 for 16-bit weights, float64 for float32."""
    try:
        return _COMPUTE_DTYPES[weight_dtype]
    except KeyError:
        raise TypeError(f"cannot fold into a {weight_dtype} weight; only floating point weights are adapted") from None


@dataclass(frozen=True)
class VeraDelta:
    """One adapter's change to one weight: `diag(lambda_b) @ vera_B[:out] @ diag(lambda_d) @ vera_A[:, :in]`.

    Transposed when `fan_in_fan_out` (the weight is stored `[in, out]`). The projections are the shared, unsliced
    tensors. Products of two float32 (or narrower) values are exact in float64, so `factors(torch.float64)` and
    the rows and columns below carry the delta without any rounding.
    """

    lambda_b: torch.Tensor
    lambda_d: torch.Tensor
    vera_A: torch.Tensor
    vera_B: torch.Tensor
    in_features: int
    out_features: int
    fan_in_fan_out: bool = False
    projection_floor: float | None = None  # a lower bound of the smallest non-zero |entry| of vera_A and vera_B

    def float32_factors_exact_enough(self) -> bool:
        """Whether each float32 factor entry is within float32's relative rounding of its exact value.

        True unless some product of a lambda and a projection entry, both non-zero, falls below float32's smallest
        normal number (for example lambdas near 1e-39): such entries are subnormal or zero and the fold's error
        bound, which is relative, would not hold for them.
        """
        tiny = torch.finfo(torch.float32).tiny
        projections = self.projection_floor
        if projections is None:
            in_side, out_side = self.vera_A[:, : self.in_features], self.vera_B[: self.out_features]
            projections = min(smallest_magnitude(in_side), smallest_magnitude(out_side))
        lambdas = min(smallest_magnitude(self.lambda_b), smallest_magnitude(self.lambda_d))
        return lambdas * projections >= tiny

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """`(left, right)` with `left @ right = delta_W` in the weight's layout, each product rounded once to `dtype`.

        Shapes (rows, r) and (r, cols), where (rows, cols) is the weight's stored shape.
        """
        device = self.vera_A.device
        scaled_B = _scale(self.lambda_b.to(device), self.vera_B[: self.out_features], dtype)
        scaled_A = _scale(self.lambda_d.to(device), self.vera_A[:, : self.in_features], dtype)
        return (scaled_A.T, scaled_B.T) if self.fan_in_fan_out else (scaled_B, scaled_A)

    def left_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Exact float64 rows `rows` of `left`, shape (len(rows), r)."""
        if self.fan_in_fan_out:
            return (self.lambda_d.double()[:, None] * torch.index_select(self.vera_A, 1, rows).double()).T
        return self.lambda_b[rows].double()[:, None] * self.vera_B[rows].double()

    def right_columns(self, columns: torch.Tensor) -> torch.Tensor:
        """Exact float64 columns `columns` of `right`, as rows: shape (len(columns), r)."""
        if self.fan_in_fan_out:
            return self.lambda_b[columns].double()[:, None] * self.vera_B[columns].double()
        return (self.lambda_d.double()[:, None] * torch.index_select(self.vera_A, 1, columns).double()).T


def smallest_magnitude(tensor: torch.Tensor) -> float:
    """The smallest non-zero |element| (in float64), or infinity when there is none."""
    magnitudes = tensor.abs().double()
    return magnitudes.masked_fill_(magnitudes == 0, math.inf).min().item() if tensor.numel() else math.inf


def _scale(vector: torch.Tensor, matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float64:
        return vector.double()[:, None] * matrix.double()
    # In float32 the product rounds once either way; skipping the float64 detour saves a pass per layer.
    return vector.to(dtype)[:, None] * matrix.to(dtype)


@torch.no_grad()
def fold(
    weight: torch.Tensor,
    deltas: Sequence[VeraDelta],
    alpha: float = 1.0,
    out: torch.Tensor | None = None,
    block_rows: int = 512,
) -> torch.Tensor:
    """Return `weight + alpha * sum(deltas)`, within 1 ulp of exact, in `weight.dtype`.

    Several deltas are one product of concatenated factors. Per block of rows: the product is formed in the
    compute dtype (see `compute_dtype`) with one matrix multiplication, the weight is added with one rounding, and
    the block is rounded to the weight's dtype. The few elements whose result the compute precision cannot vouch
    for are noted on the way and recomputed at the end from exact factors (see `_CancellationGuard`).

    Args:
        weight: The stored weight, on the device to compute on; not modified unless it is also `out`.
        deltas: The adapters' changes to this weight, their tensors on the same device.
        alpha: 1 to merge, -1 to unmerge.
        out: Where to write the result (may be `weight` itself); a new tensor like `weight` when None.
        block_rows: Rows per block; bounds the scratch buffers to `2 * block_rows * cols` elements.

    Returns:
        `out`.

    Raises:
        FloatingPointError: The sum overflows the weight's dtype (or is NaN) where the weight itself is finite.
    """
    if out is None:
        out = torch.empty_like(weight)
    dtype = compute_dtype(weight.dtype)
    if dtype == torch.float32 and not all(delta.float32_factors_exact_enough() for delta in deltas):
        dtype = torch.float64  # lambdas near float32's underflow: products of two float32 values never underflow float64
    factors = [delta.factors(dtype) for delta in deltas]
    left_c = torch.cat([left for left, _ in factors], dim=1) if len(factors) > 1 else factors[0][0]
    right_c = torch.cat([right for _, right in factors], dim=0) if len(factors) > 1 else factors[0][1]
    if alpha != 1:
        left_c = left_c * alpha  # exact: alpha is +-1
    guard = _CancellationGuard(weight.dtype, dtype, left_c, right_c, deltas, alpha)
    rows = weight.shape[0]
    shape = (min(block_rows, rows), weight.shape[1])
    buffer = torch.empty(shape, dtype=dtype, device=weight.device)
    scratch = torch.empty(shape, dtype=dtype, device=weight.device)
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        block = buffer[: stop - start]
        torch.mm(left_c[start:stop], right_c, out=block)
        # Converting first and adding in one dtype is twice as fast as a mixed-dtype add.
        block.add_(scratch[: stop - start].copy_(weight[start:stop]))
        guard.inspect(block, weight[start:stop], start, scratch[: stop - start])
        out[start:stop].copy_(block)
    guard.repair(out)
    return out


class _CancellationGuard:
    """Finds the elements whose computed sum may be more than 1 ulp (of the output dtype) off, and fixes them.

    With unit roundoff `u` of the compute dtype, `k` terms and exact factors `l`, `r`, the computed product
    (factors rounded to the compute dtype, products accumulated in any order) is within `gamma_{k+2} S` of exact,
    where `S = sum_k |l_k r_k| <= ||l_i|| ||r_j||`, and adding the weight rounds once more, by at most
    `u |y| / (1 - u)`. Rounding the sum `y` to a dtype with `p` significand bits is within 1 ulp of exact whenever
    the error is at most `m |y|` with `m = 2**-(p + 1)`. So an element can need repair only if
    `|y_ij| < K ||l_i|| ||r_j||` with `K = gamma_{k+2} / (m - 2u)`: one rank-1 update and one reduction per block
    find out. Those elements are recomputed in float64 from the exact factors and, where even that cannot vouch
    for the result, exactly.
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
        self.margin = 2.0 ** -(_SIGNIFICAND_BITS[out_dtype] + 1)
        self.out_dtype = out_dtype
        # Sums at least this large round to infinity in the output dtype. A delta smaller than half the spacing
        # of the largest values cannot get there from a finite weight, so then the check is skipped.
        info = torch.finfo(out_dtype)
        half_spacing = info.eps * 2.0 ** (math.floor(math.log2(info.max)) - 1)
        self.overflow = info.max + half_spacing
        u = torch.finfo(dtype).eps / 2
        # 1 + 2**-10 on top: the test itself is computed in the compute dtype.
        self.scale = gamma(k + 2, dtype) / (self.margin - 2 * u) * (1 + 2.0**-10)
        self.gamma64 = gamma(k + 2, torch.float64)
        self.exact_compute = dtype == torch.float64
        self.deltas, self.alpha = deltas, alpha
        # Norms nudged up by more than their own rounding error and the factors' rounding to the compute dtype
        # could take off, so the bound never comes out too small.
        # Squared in float64, where squares of float32 values neither underflow nor overflow.
        nudge = 1 + 2 * gamma(k + 2, dtype)
        self.row_norms = left.double().square().sum(dim=1).sqrt() * nudge
        self.col_norms = right.double().square().sum(dim=0).sqrt() * nudge
        self.row_norms_c, self.col_norms_c = self.row_norms.to(dtype), self.col_norms.to(dtype)
        largest_delta = (self.row_norms.max() * self.col_norms.max()).item() if left.numel() and right.numel() else 0.0
        self.may_overflow = largest_delta >= half_spacing
        self.suspects: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, cols, weight values)
        self._all_columns: torch.Tensor | None = None

    def _exact_left(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([delta.left_rows(rows) for delta in self.deltas], dim=1) * self.alpha

    def _exact_right(self, columns: torch.Tensor) -> torch.Tensor:
        return torch.cat([delta.right_columns(columns) for delta in self.deltas], dim=1)

    def inspect(self, block: torch.Tensor, weight: torch.Tensor, start: int, scratch: torch.Tensor) -> None:
        """Note the elements of one computed block that may need repair (a few passes over the block)."""
        torch.abs(block, out=scratch)
        if self.may_overflow and not scratch.amax() < self.overflow and torch.isfinite(weight).all():
            raise FloatingPointError(f"overflows {self.out_dtype} (or gives NaN) in rows {start}-{start + len(block) - 1}")
        scratch.addr_(self.row_norms_c[start : start + len(block)], self.col_norms_c, alpha=-self.scale)
        if block.numel() == 0:
            return
        # Suspects are rare and scattered: find their rows first, then look only there.
        rows = (scratch.amin(dim=1) < 0).nonzero().flatten()
        if rows.numel() == 0:
            return
        where = (scratch[rows] < 0).nonzero()
        i, j = rows[where[:, 0]], where[:, 1]
        w = weight[i, j].double()
        if not self.exact_compute and i.numel() > block.numel() // _DENSE:
            # Many suspects (a delta as large as the weights): one float64 product beats gathering rows.
            if self._all_columns is None:
                self._all_columns = self._exact_right(torch.arange(block.shape[1], device=block.device)).T
            block_rows = torch.arange(start, start + len(block), device=block.device)
            recomputed = torch.addmm(weight.double(), self._exact_left(block_rows), self._all_columns)[i, j]
            safe = self._safe(start + i, j, w, recomputed)
            block[i[safe], j[safe]] = recomputed[safe].to(block.dtype)
            i, j, w = i[~safe], j[~safe], w[~safe]
            if not i.numel():
                return
        self.suspects.append((start + i, j, w))

    def repair(self, out: torch.Tensor) -> None:
        """Recompute every noted element from exact factors, rounding straight from float64 (or exact) into `out`."""
        if not self.suspects:
            return
        i, j, w = (torch.cat(parts) for parts in zip(*self.suspects))
        for ci, cj, cw in zip(i.split(_CHUNK), j.split(_CHUNK), w.split(_CHUNK)):
            left, right = self._exact_left(ci), self._exact_right(cj)
            if not self.exact_compute:
                recomputed = (left * right).sum(dim=1).add_(cw)
                safe = self._safe(ci, cj, cw, recomputed)
                out[ci[safe], cj[safe]] = recomputed[safe].to(out.device, out.dtype)
                unsafe = ~safe
                ci, cj, cw, left, right = ci[unsafe], cj[unsafe], cw[unsafe], left[unsafe], right[unsafe]
            if ci.numel():
                out[ci, cj] = _exact_sums(cw, left, right).to(out.device, out.dtype)

    def _safe(self, i: torch.Tensor, j: torch.Tensor, w: torch.Tensor, recomputed: torch.Tensor) -> torch.Tensor:
        """Whether float64 vouches for each recomputed element (same test, with float64's error bound)."""
        bound = self.gamma64 * (w.abs() + self.row_norms[i] * self.col_norms[j])
        return bound <= self.margin * recomputed.abs()


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's `gamma_n = n u / (1 - n u)`: bounds the relative error of n roundings in `dtype`."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def _exact_sums(w: torch.Tensor, left_rows: torch.Tensor, right_cols: torch.Tensor) -> torch.Tensor:
    """`w + sum(left_rows * right_cols, dim=1)` correctly rounded to float64, via error-free products.

    Factors are exact products of two float32 values, so they have at most 48 significant bits: splitting each
    into a float32 head and a tail makes every partial product exact in float64, and `math.fsum` adds exactly.
    """
    l = left_rows.cpu().numpy()
    r = right_cols.cpu().numpy()
    l_hi = l.astype(np.float32).astype(np.float64)
    r_hi = r.astype(np.float32).astype(np.float64)
    l_lo, r_lo = l - l_hi, r - r_hi
    parts = np.concatenate([l_hi * r_hi, l_hi * r_lo, l_lo * r_hi, l_lo * r_lo], axis=1)
    sums = [math.fsum([wk, *row]) for wk, row in zip(w.cpu().tolist(), parts)]
    return torch.tensor(sums, dtype=torch.float64)
