"""The fold is correctly rounded: every element within 1 ulp of the exact `W + delta_W`, unlike PEFT's merge."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import cancelling_weight, exact_fold, random_delta, ulp_errors
from vera_export.fold import VeraDelta, _full_float32_matmul, fold
from vera_export.precision import ulp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fold_is_within_one_ulp_ofexact_fold(dtype: torch.dtype, fan_in_fan_out: bool) -> None:
    rows, cols, r = 24, 20, 8
    delta = random_delta(rows, cols, r, fan_in_fan_out)
    left, right = delta.factors()
    assert left.shape == (rows, r) and right.shape == (r, cols)
    weight = cancelling_weight(dtype, left, right)
    merged = fold(weight, [delta])
    assert merged.dtype == dtype
    errors = ulp_errors(merged, exact_fold(weight, [(left, right)]))
    assert errors.max() <= 1.0


def test_factors_are_the_vera_delta() -> None:
    """`left @ right` is diag(lambda_b) B[:out] diag(lambda_d) A[:, :in], transposed for fan_in_fan_out."""
    d = random_delta(6, 5, 3, False)
    expected = (
        torch.diag(d.lambda_b.double())
        @ d.vera_B[:6].double()
        @ torch.diag(d.lambda_d.double())
        @ d.vera_A[:, :5].double()
    )
    left, right = d.factors()
    assert left.dtype == right.dtype == torch.float64
    torch.testing.assert_close(left @ right, expected, rtol=1e-12, atol=1e-15)
    transposed = VeraDelta(d.lambda_b, d.lambda_d, d.vera_A, d.vera_B, 5, 6, fan_in_fan_out=True)
    left_t, right_t = transposed.factors()
    torch.testing.assert_close(left_t @ right_t, expected.T, rtol=1e-12, atol=1e-15)
    # The exact rows and columns the guard recomputes from are those of the float64 factors, in both layouts.
    for delta, (lt, rt) in ((d, (left, right)), (transposed, (left_t, right_t))):
        rows, columns = torch.tensor([0, 4]), torch.tensor([1, 2])
        assert torch.equal(delta.left_rows(rows), lt[rows]) and torch.equal(
            delta.right_columns(columns), rt[:, columns].T
        )
    # In float32 each product is rounded once: the float64 factors rounded.
    assert all(torch.equal(a, b.float()) for a, b in zip(d.factors(torch.float32), d.factors()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "b_scale, d_scale",
    [(1e-30, 1e28), (3e-39, 1e36)],
    ids=["factor squares underflow", "subnormal float32 factors"],
)
def test_extreme_lambda_scales_stay_within_one_ulp(dtype, b_scale: float, d_scale: float) -> None:
    """Lambdas at the ends of float32's range: the error bound must not rest on a norm or factor that underflowed.

    With lambda_b near 1e-30 the squares of a factor row underflow float32, so a float32 norm would be 0 and no
    element would be suspect; near 3e-39 the float32 factors themselves are subnormal and lose their precision.
    """
    g = torch.Generator().manual_seed(11)
    rows, cols, r = 24, 20, 8
    lambda_b = torch.randn(rows, generator=g) * b_scale
    lambda_d = torch.randn(r, generator=g) * d_scale
    vera_A, vera_B = torch.rand(r, cols, generator=g) - 0.5, torch.rand(rows, r, generator=g) - 0.5
    delta = VeraDelta(lambda_b, lambda_d, vera_A, vera_B, cols, rows)
    left, right = delta.factors()
    weight = cancelling_weight(dtype, left, right)
    merged = fold(weight, [delta])
    assert ulp_errors(merged, exact_fold(weight, [(left, right)])).max() <= 1.0


def test_several_adapters_round_once() -> None:
    dtype = torch.bfloat16
    deltas = [random_delta(16, 12, 4, False, seed=s) for s in (1, 2, 3)]
    factors = [d.factors() for d in deltas]
    left, right = torch.cat([lf for lf, _ in factors], dim=1), torch.cat([rf for _, rf in factors], dim=0)
    weight = cancelling_weight(dtype, left, right)
    merged = fold(weight, deltas)
    assert ulp_errors(merged, exact_fold(weight, factors)).max() <= 1.0
    # Folding one adapter at a time rounds three times, and is measurably worse somewhere.
    sequential = weight
    for d in deltas:
        sequential = fold(sequential, [d])
    assert ulp_errors(sequential, exact_fold(weight, factors)).max() > 1.0


def test_block_size_does_not_change_the_result() -> None:
    delta = random_delta(100, 37, 8, False)
    weight = torch.randn(100, 37).to(torch.bfloat16)
    reference = fold(weight, [delta], block_rows=512)
    for block_rows in (1, 7, 64):
        assert torch.equal(fold(weight, [delta], block_rows=block_rows), reference)


def test_fold_in_place_and_unmerge_round_trip() -> None:
    dtype = torch.bfloat16
    delta = random_delta(32, 16, 8, False)
    base = torch.randn(32, 16).to(dtype)
    weight = base.clone()
    fold(weight, [delta], out=weight)
    merged = weight.clone()
    assert not torch.equal(merged, base)
    fold(weight, [delta], alpha=-1.0, out=weight)
    bound = ulp(merged, dtype) + ulp(base, dtype)
    assert ((weight.double() - base.double()).abs() <= bound).all()


def test_cuda_folds_in_full_float32_whatever_tf32_setting_the_caller_chose() -> None:
    matmul = torch.backends.cuda.matmul
    caller = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with _full_float32_matmul(torch.device("cuda")):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = caller


def test_the_cpu_folds_in_full_float32_whatever_matmul_precision_the_caller_chose() -> None:
    """`torch.set_float32_matmul_precision("medium")`, common in training scripts, lets oneDNN multiply float32 in
    bfloat16 on CPUs with AMX: off by far more than the guard's bound. The fold turns it off while it runs (where
    oneDNN has no bfloat16 kernel the setting changes nothing, and only the setting's check can fail)."""
    delta = random_delta(256, 512, 64, False, seed=2)
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    left, right = delta.factors()
    caller = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with _full_float32_matmul(torch.device("cpu")):  # on any CPU, whether or not it has bfloat16 kernels
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        merged = fold(weight, [delta])
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(caller)
    reference = weight.double() + left @ right  # float64 resolves far below an ulp of bfloat16 here
    assert ((merged.double() - reference).abs() <= ulp(merged, torch.bfloat16)).all()


@pytest.mark.parametrize(
    "lambda_b, lambda_d, vera_A, vera_B",
    [
        # Terms of +-2.4e38 that cancel to 0: partial sums overflow float32.
        ([3e38], [1.0] * 4, [[0.9], [0.9], [-0.9], [-0.9]], [[0.9, 0.9, 0.9, 0.9]]),
        # lambda_b * vera_B = 1e39 overflows float32; the delta is 5e8.
        ([1e37], [1e-30], [[0.5]], [[100.0]]),
    ],
    ids=["partial sums", "factor"],
)
def test_factors_beyond_float32_range_fold_in_float64(lambda_b, lambda_d, vera_A, vera_B) -> None:
    delta = VeraDelta(*(torch.tensor(t) for t in (lambda_b, lambda_d, vera_A, vera_B)), 1, 1)
    assert not delta.fits_float32()
    weight = torch.zeros(1, 1, dtype=torch.bfloat16)
    merged = fold(weight, [delta])
    assert ulp_errors(merged, exact_fold(weight, [delta.factors()])).max() <= 1.0
