"""The fold is correctly rounded: every element within 1 ulp of the exact `W + delta_W`, unlike PEFT's merge."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from vera_export.fold import compute_dtype, fold, layer_factors, stack_factors
from vera_export.verification import ulp


def _exact(weight: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[Fraction]]:
    """`weight + sum(left @ right)` in exact rational arithmetic."""
    rows, cols = weight.shape
    exact = [[Fraction(float(weight[i, j])) for j in range(cols)] for i in range(rows)]
    for left, right in factors:
        left_f = [[Fraction(float(v)) for v in row] for row in left.double().tolist()]
        right_f = [[Fraction(float(v)) for v in row] for row in right.double().tolist()]
        for i in range(rows):
            for j in range(cols):
                exact[i][j] += sum(left_f[i][k] * right_f[k][j] for k in range(len(right_f)))
    return exact


def _ulp_errors(result: torch.Tensor, exact: list[list[Fraction]]) -> torch.Tensor:
    """|result - exact| in units of the result's ulp, element by element."""
    spacing = ulp(result, result.dtype)
    errors = [
        [float(abs(Fraction(float(result[i, j])) - exact[i][j]) / Fraction(float(spacing[i, j]))) for j in range(result.shape[1])]
        for i in range(result.shape[0])
    ]
    return torch.tensor(errors)


def _random_layer(rows: int, cols: int, r: int, fan_in_fan_out: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    in_features, out_features = (rows, cols) if fan_in_fan_out else (cols, rows)
    lambda_b = torch.randn(out_features, generator=g) * 0.1
    lambda_d = torch.randn(r, generator=g) * 0.5
    vera_A = torch.rand(r, in_features + 3, generator=g) - 0.5  # wider than the layer: sliced, as in PEFT
    vera_B = torch.rand(out_features + 5, r, generator=g) - 0.5
    return lambda_b, lambda_d, vera_A, vera_B, in_features, out_features


def _cancelling_weight(dtype: torch.dtype, left: torch.Tensor, right: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A weight where a quarter of the elements are -delta rounded to `dtype`: near-total cancellation."""
    g = torch.Generator().manual_seed(seed)
    delta = left.double() @ right.double()
    weight = (torch.randn(delta.shape, generator=g, dtype=torch.float64) * delta.abs().mean()).to(dtype)
    mask = torch.rand(delta.shape, generator=g) < 0.25
    weight[mask] = (-delta).to(dtype)[mask]
    return weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fold_is_within_one_ulp_of_exact(dtype: torch.dtype, fan_in_fan_out: bool) -> None:
    rows, cols, r = 24, 20, 8
    lambda_b, lambda_d, vera_A, vera_B, n_in, n_out = _random_layer(rows, cols, r, fan_in_fan_out)
    left, right = layer_factors(lambda_b, lambda_d, vera_A, vera_B, n_in, n_out, fan_in_fan_out)
    assert left.shape == (rows, r) and right.shape == (r, cols)
    weight = _cancelling_weight(dtype, left, right)
    merged = fold(weight, left, right)
    assert merged.dtype == dtype
    errors = _ulp_errors(merged, _exact(weight, [(left, right)]))
    assert errors.max() <= 1.0


def test_factors_are_the_vera_delta() -> None:
    """`left @ right` is diag(lambda_b) B[:out] diag(lambda_d) A[:, :in], transposed for fan_in_fan_out."""
    lambda_b, lambda_d, vera_A, vera_B, n_in, n_out = _random_layer(6, 5, 3, False)
    delta = torch.diag(lambda_b.double()) @ vera_B[:n_out].double() @ torch.diag(lambda_d.double()) @ vera_A[:, :n_in].double()
    left, right = layer_factors(lambda_b, lambda_d, vera_A, vera_B, n_in, n_out, False)
    assert left.dtype == right.dtype == torch.float64
    torch.testing.assert_close(left @ right, delta, rtol=1e-12, atol=1e-15)
    left_t, right_t = layer_factors(lambda_b, lambda_d, vera_A, vera_B, n_in, n_out, True)
    torch.testing.assert_close(left_t @ right_t, delta.T, rtol=1e-12, atol=1e-15)


def test_several_adapters_round_once() -> None:
    dtype = torch.bfloat16
    layers = [_random_layer(16, 12, 4, False, seed=s) for s in (1, 2, 3)]
    factors = [layer_factors(*layer, False) for layer in layers]
    left, right = stack_factors(factors)
    weight = _cancelling_weight(dtype, left, right)
    merged = fold(weight, left, right)
    assert _ulp_errors(merged, _exact(weight, factors)).max() <= 1.0
    # Folding one adapter at a time rounds three times, and is measurably worse somewhere.
    sequential = weight
    for f in factors:
        sequential = fold(sequential, *f)
    assert _ulp_errors(sequential, _exact(weight, factors)).max() > 1.0


def test_block_size_does_not_change_the_result() -> None:
    lambda_b, lambda_d, vera_A, vera_B, n_in, n_out = _random_layer(100, 37, 8, False)
    left, right = layer_factors(lambda_b, lambda_d, vera_A, vera_B, n_in, n_out, False)
    weight = torch.randn(100, 37).to(torch.bfloat16)
    reference = fold(weight, left, right, block_rows=512)
    for block_rows in (1, 7, 64):
        assert torch.equal(fold(weight, left, right, block_rows=block_rows), reference)


def test_fold_in_place_and_unmerge_round_trip() -> None:
    dtype = torch.bfloat16
    lambda_b, lambda_d, vera_A, vera_B, n_in, n_out = _random_layer(32, 16, 8, False)
    left, right = layer_factors(lambda_b, lambda_d, vera_A, vera_B, n_in, n_out, False)
    base = torch.randn(32, 16).to(dtype)
    weight = base.clone()
    fold(weight, left, right, out=weight)
    merged = weight.clone()
    assert not torch.equal(merged, base)
    fold(weight, left, right, alpha=-1.0, out=weight)
    bound = ulp(merged, dtype) + ulp(base, dtype)
    assert ((weight.double() - base.double()).abs() <= bound).all()


def test_compute_dtype_rule() -> None:
    assert compute_dtype(torch.bfloat16) == compute_dtype(torch.float16) == torch.float32
    assert compute_dtype(torch.float32) == torch.float64
    with pytest.raises(TypeError):
        compute_dtype(torch.int8)
