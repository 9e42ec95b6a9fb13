"""Floating point facts the fold and the verification rest on: compute dtypes, ulps, roundoffs, error bounds, a
single rounding from float64, and exact sums; each against numpy or exact rational arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from vera_export.precision import (
    FOLDABLE_DTYPES,
    SIGNIFICAND_BITS,
    _narrow_carefully,
    all_finite,
    compute_dtype,
    exact_sums,
    gamma,
    largest_magnitude,
    narrow,
    smallest_magnitude,
    sparse_nonzero,
    ulp,
    unit_roundoff,
)

FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _rounded(value: float, dtype: torch.dtype) -> float:
    """`value` rounded once, to nearest even, to `dtype` (finite range), in exact arithmetic."""
    if value == 0:
        return value
    digits, (_, exponent) = SIGNIFICAND_BITS[dtype], math.frexp(value)
    smallest_exponent = math.frexp(torch.finfo(dtype).tiny)[1]  # the binade of the smallest normal number
    quantum = Fraction(2) ** (max(exponent, smallest_exponent) - digits)
    return float(round(Fraction(value) / quantum) * quantum)  # round() of a Fraction: half to even


def _spacing(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The distance from |values| (in `dtype`) to the next larger number of `dtype`."""
    magnitudes = values.to(dtype).abs()
    return (
        torch.nextafter(magnitudes, torch.full_like(magnitudes, math.inf)).double() - magnitudes.double()
    ).abs()


def _samples(dtype: torch.dtype) -> torch.Tensor:
    """Numbers of `dtype` from its subnormals to near its largest, of both signs."""
    info = torch.finfo(dtype)
    g = torch.Generator().manual_seed(0)
    exponents = torch.randint(
        math.frexp(info.tiny)[1] - SIGNIFICAND_BITS[dtype] + 1, 127, (4000,), generator=g
    )
    exponents = exponents.clamp_max(math.frexp(info.max)[1] - 1)
    values = (torch.rand(4000, generator=g, dtype=torch.float64) + 0.5) * torch.exp2(exponents.double())
    values[::2] *= -1
    return values.to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_ulp_is_the_spacing_of_the_dtype(dtype: torch.dtype) -> None:
    """Normal and subnormal numbers alike, against torch's nextafter in `dtype` and numpy's spacing."""
    values = _samples(dtype)
    assert torch.equal(ulp(values, dtype), _spacing(values, dtype))
    if dtype != torch.bfloat16:  # numpy has no bfloat16
        numpy_dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[dtype]
        spacing = np.abs(np.spacing(np.abs(values.numpy().astype(numpy_dtype)))).astype(np.float64)
        assert torch.equal(ulp(values, dtype), torch.from_numpy(spacing))
    # Any float tensor, as if it were stored in `dtype`: a float64 value between two of them.
    assert torch.equal(ulp(values.double() * (1 + 2.0**-60), dtype), ulp(values, dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_the_ulp_of_infinity_is_infinite_and_of_nan_nan(dtype: torch.dtype) -> None:
    spacing = ulp(torch.tensor([float("inf"), float("-inf"), float("nan")]), dtype)
    assert spacing[0] == spacing[1] == math.inf and spacing[2].isnan()


@pytest.mark.parametrize("dtype", FLOATS)
def test_the_ulp_of_zero_is_the_smallest_subnormal(dtype: torch.dtype) -> None:
    zero = torch.zeros(1)
    assert (
        ulp(zero, dtype).item()
        == _spacing(zero, dtype).item()
        == math.ldexp(torch.finfo(dtype).tiny, 1 - SIGNIFICAND_BITS[dtype])
    )


@pytest.mark.parametrize("dtype", FLOATS)
def test_unit_roundoff_and_gamma(dtype: torch.dtype) -> None:
    u = unit_roundoff(dtype)
    assert u == torch.finfo(dtype).eps / 2 == 2.0 ** -SIGNIFICAND_BITS[dtype]
    assert gamma(1, dtype) == u / (1 - u) and gamma(10, dtype) == 10 * u / (1 - 10 * u)
    assert u < gamma(1, dtype) < gamma(2, dtype)


def test_compute_dtype_rule() -> None:
    assert compute_dtype(torch.bfloat16) == compute_dtype(torch.float16) == torch.float32
    assert compute_dtype(torch.float32) == torch.float64
    with pytest.raises(TypeError):
        compute_dtype(torch.int8)


def test_foldable_dtypes_are_the_floating_point_ones() -> None:
    assert frozenset(FLOATS) == FOLDABLE_DTYPES
    with pytest.raises(TypeError, match="only floating point weights are adapted"):
        compute_dtype(torch.float8_e4m3fn)


def test_smallest_and_largest_magnitude() -> None:
    values = torch.tensor([0.0, -3.0, 2.0**-140, 0.5])
    assert (smallest_magnitude(values), largest_magnitude(values)) == (2.0**-140, 3.0)
    assert smallest_magnitude(torch.zeros(3)) == math.inf and largest_magnitude(torch.zeros(3)) == 0.0
    assert smallest_magnitude(torch.empty(0)) == math.inf and largest_magnitude(torch.empty(0)) == 0.0


def test_narrow_rounds_float64_once() -> None:
    """Against numpy's direct float64 -> float16 rounding, on values built to sit next to float16 midpoints."""
    g = torch.Generator().manual_seed(0)
    halves = torch.randn(20000, generator=g, dtype=torch.float64).to(torch.float16).double()
    spacing = ulp(halves.to(torch.float16), torch.float16)
    values = halves + spacing / 2 + torch.randint(-3, 4, halves.shape, generator=g) * 2.0**-40 * spacing
    values = torch.cat(
        [values, torch.tensor([65519.999999, 65520.0, -65519.9999, 1e300, float("inf"), 0.0, -0.0])]
    )
    with np.errstate(over="ignore"):  # 1e300 -> inf, as intended
        expected = torch.from_numpy(values.numpy().astype(np.float16))
    assert torch.equal(narrow(values, torch.float16).view(torch.int16), expected.view(torch.int16))
    assert not torch.equal(
        values.to(torch.float16).view(torch.int16), expected.view(torch.int16)
    )  # torch's own


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_rounds_to_nearest_even_in_exact_arithmetic(dtype: torch.dtype) -> None:
    """Values just off and exactly on midpoints of `dtype`, subnormals included, against exact rounding."""
    g = torch.Generator().manual_seed(1)
    lower = _samples(dtype)[:1500].double()
    spacing = ulp(lower, dtype) * lower.sign()
    offsets = torch.randint(-3, 4, lower.shape, generator=g).double() * 2.0**-36
    values = lower + spacing / 2 + offsets * spacing
    expected = torch.tensor([_rounded(v, dtype) for v in values.tolist()], dtype=torch.float64)
    assert torch.equal(narrow(values, dtype).double(), expected)
    assert not torch.equal(values.to(dtype).double(), expected)  # torch's own rounds twice: the test can tell


def test_narrow_to_a_wide_dtype_or_from_float32_is_a_plain_conversion() -> None:
    values = torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(narrow(values, torch.float32), values.to(torch.float32))
    assert torch.equal(narrow(values.float(), torch.bfloat16), values.float().to(torch.bfloat16))


def test_exact_sums_are_correctly_rounded_where_float64_cancels() -> None:
    """`w + sum(l * r)` for factors that are products of float32 values, with the weight cancelling the sum to
    far below its terms: the result is the exact sum rounded once, as Fraction arithmetic has it."""
    g = torch.Generator().manual_seed(3)

    def float32_products(
        shape: tuple[int, int],
    ) -> torch.Tensor:  # exact in float64, as the fold's factors are
        a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        scale = torch.exp2(torch.randint(-60, 60, shape, generator=g).float())
        return (a * scale).double() * b.double()

    left, right = float32_products((64, 16)), float32_products((64, 16))
    naive = (left * right).sum(dim=1)
    w = -naive  # float64's own sum, negated: the exact total is the rounding error of that sum
    expected = [
        float(Fraction(wk) + sum(Fraction(a) * Fraction(b) for a, b in zip(lk, rk)))
        for wk, lk, rk in zip(w.tolist(), left.tolist(), right.tolist())
    ]
    sums = exact_sums(w, left, right)
    assert sums.dtype == torch.float64 and sums.tolist() == expected
    assert (w + naive).tolist() != expected  # float64 alone says 0 where the exact sum is not


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_takes_the_careful_path_wherever_it_differs(dtype: torch.dtype) -> None:
    """The fast path keeps torch's double rounding except at float32 midpoints of `dtype` and outside float16's
    normal range: on values of every magnitude, midpoints and float32-exact values among them, it must agree with
    the careful rounding everywhere."""
    g = torch.Generator().manual_seed(3)
    magnitudes = 2.0 ** torch.randint(-150, 128, (40000,), generator=g).double()
    values = torch.randn(40000, generator=g, dtype=torch.float64) * magnitudes
    on_float32 = values[:10000].float().double()  # exact in float32, many on midpoints after a cut
    cut = 0xFFFF if dtype == torch.bfloat16 else 0x1FFF
    half = 0x8000 if dtype == torch.bfloat16 else 0x1000
    midpoints = (on_float32.float().view(torch.int32) & ~cut | half).view(torch.float32).double()
    nudged = midpoints * (
        1 + torch.randint(-1, 2, midpoints.shape, generator=g).double() * 2.0**-40
    )  # float32 ties there
    extremes = torch.tensor(
        [3.3961e38, -3.3962e38, 65520.0, 65519.99999, 2.0**-25, 2.0**-25 * (1 + 2.0**-40)]
    )
    values = torch.cat([values, on_float32, midpoints, nudged, extremes.double()])
    values = values[values.isfinite()]
    with torch.no_grad():
        fast, careful = narrow(values, dtype), _narrow_carefully(values, dtype)
    assert torch.equal(fast.view(torch.int16), careful.view(torch.int16))
    # The fold's way in: the float32 rounding done already, written into a row of the output (or a strided one).
    rows = values[: len(values) // 2 * 2].view(2, -1)
    for out in (torch.empty_like(rows, dtype=dtype), torch.empty(rows.T.shape, dtype=dtype).T):
        narrow(rows, dtype, single=rows.float(), out=out)
        assert torch.equal(out.reshape(-1).view(torch.int16), careful[: rows.numel()].view(torch.int16))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_all_finite_finds_any_nan_or_inf(dtype: torch.dtype, bad: float | None) -> None:
    values = torch.randn(3, 1000, generator=torch.Generator().manual_seed(4)).to(dtype)
    if bad is not None:
        values[2, 777] = bad
    assert all_finite(values) is (bad is None)
    assert all_finite(values[:2]) and all_finite(torch.empty(0, dtype=dtype))


@pytest.mark.parametrize("n", [0, 7, 64, 4097, 100_000])
@pytest.mark.parametrize("share", [0.0, 1e-5, 1e-3, 0.05, 0.5])
def test_sparse_nonzero_finds_what_nonzero_finds(n: int, share: float) -> None:
    """The span-by-span search narrow() and the fold's guard use for their few elements, whatever their number
    and place: 2-D masks, the tail past the last whole span, a mask that starts mid-storage."""
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < share
    if n:
        mask[-1] = True
    assert torch.equal(sparse_nonzero(mask), mask.nonzero().squeeze(1))
    if n >= 64:
        square = mask[: n - n % 64].view(-1, 64)
        assert torch.equal(sparse_nonzero(square), square.reshape(-1).nonzero().squeeze(1))
        assert torch.equal(sparse_nonzero(mask[3:]), mask[3:].nonzero().squeeze(1))
