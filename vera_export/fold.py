"""The fold: `W + delta_W` for one weight, rounded once, to within 1 ulp of the exact sum, always.

For a layer with `in_features` inputs and `out_features` outputs, VeRA's weight change is

    delta_W = diag(lambda_b) @ vera_B[:out, :] @ diag(lambda_d) @ vera_A[:, :in]

(transposed when the weight is stored `[in, out]`). It is a rank-r product `left @ right` with
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


@torch.no_grad()
def layer_factors(
    lambda_b: torch.Tensor,
    lambda_d: torch.Tensor,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    in_features: int,
    out_features: int,
    fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's `delta_W` as `left @ right` in the weight's storage layout, in float64.

    The products `lambda_b * vera_B` and `lambda_d * vera_A` of float32 (or narrower) values are exact in
    float64, so the factors carry the adapter's delta without any rounding.

    Returns:
        `(left, right)` of shapes (rows, r) and (r, cols), where (rows, cols) is the weight's stored shape.
    """
    device = vera_A.device
    scaled_B = lambda_b.to(device, torch.float64)[:, None] * vera_B[:out_features].double()
    scaled_A = lambda_d.to(device, torch.float64)[:, None] * vera_A[:, :in_features].double()
    if fan_in_fan_out:
        return scaled_A.T, scaled_B.T
    return scaled_B, scaled_A


def stack_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several adapters' factors on one layer as one product: the sum of their deltas."""
    if len(factors) == 1:
        return factors[0]
    return torch.cat([left for left, _ in factors], dim=1), torch.cat([right for _, right in factors], dim=0)


@torch.no_grad()
def fold(
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    alpha: float = 1.0,
    out: torch.Tensor | None = None,
    block_rows: int = 512,
) -> torch.Tensor:
    """Return `weight + alpha * left @ right`, within 1 ulp of exact, in `weight.dtype`.

    Per block of rows: the product is formed in the compute dtype (see `compute_dtype`) with one matrix
    multiplication, the weight is added with one rounding, and the block is rounded to the weight's dtype. The few
    elements whose result the compute precision cannot vouch for are noted on the way and recomputed at the end
    (see `_CancellationGuard`).

    Args:
        weight: The stored weight, on the device to compute on; not modified unless it is also `out`.
        left: (rows, k) float64 factor, same device (from `layer_factors` / `stack_factors`).
        right: (k, cols) float64 factor.
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
    if alpha != 1:
        left = left * alpha  # exact: alpha is +-1
    guard = _CancellationGuard(weight.dtype, dtype, left, right)
    left_c, right_c = left.to(dtype), right.to(dtype)
    rows = weight.shape[0]
    shape = (min(block_rows, rows), weight.shape[1])
    buffer = torch.empty(shape, dtype=dtype, device=weight.device)
    scratch = torch.empty(shape, dtype=dtype, device=weight.device)
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        block = buffer[: stop - start]
        torch.mm(left_c[start:stop], right_c, out=block)
        block.add_(weight[start:stop])
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

    def __init__(self, out_dtype: torch.dtype, dtype: torch.dtype, left: torch.Tensor, right: torch.Tensor) -> None:
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
        self.left, self.right = left, right
        # Norms in float64, nudged up so their own rounding cannot make the bound too small.
        self.row_norms = left.norm(dim=1) * (1 + 2.0**-20)
        self.col_norms = right.norm(dim=0) * (1 + 2.0**-20)
        self.row_norms_c, self.col_norms_c = self.row_norms.to(dtype), self.col_norms.to(dtype)
        largest_delta = (self.row_norms.max() * self.col_norms.max()).item() if left.numel() and right.numel() else 0.0
        self.may_overflow = largest_delta >= half_spacing
        self.suspects: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, cols, weight values)

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
            # Many candidates (a delta as large as the weights): one float64 product beats gathering rows.
            recomputed = torch.addmm(weight.double(), self.left[start : start + len(block)], self.right)[i, j]
            safe = self._safe(start + i, j, w, recomputed)
            block[i[safe], j[safe]] = recomputed[safe].to(block.dtype)
            i, j, w = i[~safe], j[~safe], w[~safe]
            if not i.numel():
                return
        self.suspects.append((start + i, j, w))

    def repair(self, out: torch.Tensor) -> None:
        """Recompute every noted element, rounding straight from float64 (or exact) into `out`."""
        if not self.suspects:
            return
        i, j, w = (torch.cat(parts) for parts in zip(*self.suspects))
        right_t = self.right.T.contiguous()  # gathering rows of it reads contiguous memory
        for ci, cj, cw in zip(i.split(_CHUNK), j.split(_CHUNK), w.split(_CHUNK)):
            if not self.exact_compute:
                recomputed = (self.left[ci] * right_t[cj]).sum(dim=1).add_(cw)
                safe = self._safe(ci, cj, cw, recomputed)
                out[ci[safe], cj[safe]] = recomputed[safe].to(out.device, out.dtype)
                ci, cj, cw = ci[~safe], cj[~safe], cw[~safe]
            if ci.numel():
                exact = _exact_sums(cw, self.left[ci], right_t[cj])
                out[ci, cj] = exact.to(out.device, out.dtype)

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
