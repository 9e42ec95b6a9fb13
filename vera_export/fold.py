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

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .guard import CancellationGuard
from .precision import (
    compute_dtype,
    largest_magnitude,
    narrow,
    smallest_magnitude,
)

# Factor entries and partial sums stay below this in float32 (far from its 2**128 overflow, leaving room for the
# weight and for the guard's own bound), else the fold runs in float64.
_FLOAT32_HEADROOM = 2.0**100


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
    # Bounds of the non-zero |entries| of vera_A and vera_B (computed from the sliced projections when None).
    projection_floor: float | None = None
    projection_ceiling: float | None = None
    # `projection_squares(vera_A, vera_B)`, shared by every layer of an adapter (from the sliced ones when None).
    projection_squares: tuple[torch.Tensor, torch.Tensor] | None = None

    def fits_float32(self) -> bool:
        """Whether the fold's float32 error bound holds for this delta: no factor entry, product or partial sum
        leaves float32's normal range.

        False only for lambdas at the ends of float32's range (near 1e-38 or 1e38): a factor entry below the
        smallest normal number keeps too few bits for a relative bound, and one past the largest becomes infinite.
        """
        floor, ceiling = self.projection_floor, self.projection_ceiling
        if floor is None or ceiling is None:
            in_side, out_side = self.vera_A[:, : self.in_features], self.vera_B[: self.out_features]
            floor = min(smallest_magnitude(in_side), smallest_magnitude(out_side))
            ceiling = max(largest_magnitude(in_side), largest_magnitude(out_side))
        smallest = min(smallest_magnitude(self.lambda_b), smallest_magnitude(self.lambda_d)) * floor
        largest_b, largest_d = (
            largest_magnitude(self.lambda_b) * ceiling,
            largest_magnitude(self.lambda_d) * ceiling,
        )
        # Every partial sum of a product's k terms is at most k * largest_b * largest_d.
        largest = max(largest_b, largest_d, len(self.lambda_d) * largest_b * largest_d)
        return smallest >= torch.finfo(torch.float32).tiny and largest <= _FLOAT32_HEADROOM

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """`(left, right)` with `left @ right = delta_W` in the weight's layout, each product rounded once to `dtype`.

        Shapes (rows, r) and (r, cols), where (rows, cols) is the weight's stored shape.
        """
        device = self.vera_A.device
        scaled_B = _scale(self.lambda_b.to(device), self.vera_B[: self.out_features], dtype)
        scaled_A = _scale(self.lambda_d.to(device), self.vera_A[:, : self.in_features], dtype)
        return (scaled_A.T, scaled_B.T) if self.fan_in_fan_out else (scaled_B, scaled_A)

    def squared_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 squared norms of the exact `left`'s rows and `right`'s columns, each within `gamma_r` (float64)
        of exact: the projections' squares are exact, then one product and r - 1 sums of positive terms.

        From the squares shared by every layer, without forming either factor: `lambda_b**2` times vera_B's row
        sums on the output side, one product of `lambda_d**2` with vera_A's squares on the input side.
        """
        if self.projection_squares is None:
            a_squares, b_squares = projection_squares(
                self.vera_A[:, : self.in_features], self.vera_B[: self.out_features]
            )
        else:
            a_squares, b_squares = self.projection_squares
        in_side = self.lambda_d.double().square() @ a_squares[:, : self.in_features]
        out_side = self.lambda_b.double().square() * b_squares[: self.out_features]
        return (in_side, out_side) if self.fan_in_fan_out else (out_side, in_side)

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


def projection_squares(vera_A: torch.Tensor, vera_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(vera_A**2, row sums of vera_B**2)` in float64, for `VeraDelta.squared_norms`: the squares of float32
    entries are exact in float64."""
    return vera_A.double().square(), vera_B.double().square().sum(dim=1)


def _scale(vector: torch.Tensor, matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float64:
        return vector.double()[:, None] * matrix  # float32 entries promote exactly, without a converted copy
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
    for are noted on the way and recomputed at the end from exact factors (see `guard.CancellationGuard`).

    Args:
        weight: The stored weight, on the device to compute on; not modified unless it is also `out`.
        deltas: The adapters' changes to this weight, their tensors on the same device.
        alpha: 1 to merge, -1 to unmerge.
        out: Where to write the result (may be `weight` itself); a new tensor like `weight` when None.
        block_rows: Rows per block; bounds the scratch buffers to `2 * block_rows * cols` elements (and, when
            some element needs repair, the exact factors to `(rows + cols) * r` float64 values).

    Returns:
        `out`.

    Raises:
        FloatingPointError: The sum overflows the weight's dtype (or is NaN) where the weight itself is finite.
    """
    if out is None:
        out = torch.empty_like(weight)
    dtype = compute_dtype(weight.dtype)
    if dtype == torch.float32 and not all(delta.fits_float32() for delta in deltas):
        dtype = torch.float64  # products of two float32 values never leave float64's normal range
    factors = [delta.factors(dtype) for delta in deltas]
    left_c = torch.cat([left for left, _ in factors], dim=1) if len(factors) > 1 else factors[0][0]
    right_c = torch.cat([right for _, right in factors], dim=0) if len(factors) > 1 else factors[0][1]
    if alpha != 1:
        left_c = left_c * alpha  # exact: alpha is +-1
    guard = CancellationGuard(weight.dtype, dtype, left_c, right_c, deltas, alpha)
    rows = weight.shape[0]
    shape = (min(block_rows, rows), weight.shape[1])
    buffer = torch.empty(shape, dtype=dtype, device=weight.device)
    scratch = torch.empty(shape, dtype=dtype, device=weight.device)
    with _full_float32_matmul(weight.device):
        for start in range(0, rows, block_rows):
            stop = min(start + block_rows, rows)
            if not guard.wide:
                block = buffer[: stop - start]
                torch.mm(left_c[start:stop], right_c, out=block)
                # Converting first and adding in one dtype is twice as fast as a mixed-dtype add.
                block.add_(scratch[: stop - start].copy_(weight[start:stop]))
                if guard.inspect(block, weight[start:stop], start, scratch[: stop - start]):
                    _store(out[start:stop], block)
                    continue
            guard.fold_wide(weight[start:stop], start, out[start:stop])
    guard.repair(out)
    return out


def _store(target: torch.Tensor, values: torch.Tensor) -> None:
    """`target[...] = values`, rounded once to `target`'s dtype."""
    if values.dtype == torch.float64 and target.dtype in (torch.float16, torch.bfloat16):
        values = narrow(values, target.dtype)
    target.copy_(values)


@contextlib.contextmanager
def _full_float32_matmul(device: torch.device) -> Iterator[None]:
    """Float32 products in full float32, whatever the caller allowed: TF32 on CUDA and bfloat16 on CPUs with AMX
    (`torch.set_float32_matmul_precision("medium")` turns on either) break the error bound."""
    cuda = device.type == "cuda"
    matmul = torch.backends.cuda.matmul if cuda else getattr(torch.backends.mkldnn, "matmul", None)
    # torch >= 2.9 sets this through fp32_precision, and refuses to read the legacy flags once it has been used.
    if hasattr(matmul, "fp32_precision"):
        with _setting(matmul, "fp32_precision", "ieee"):
            yield
    elif cuda:
        with _setting(matmul, "allow_tf32", False):
            yield
    else:
        caller = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(caller)


@contextlib.contextmanager
def _setting(owner: object, name: str, value: object) -> Iterator[None]:
    caller = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, caller)
