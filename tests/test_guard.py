"""The cancellation guard: the elements whose sum the compute precision cannot vouch for are found and
recomputed (in float64, exactly, or whole blocks in float64), NaN and Inf kept, overflow decided exactly."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from tests.helpers import cancelling_weight, exact_fold, random_delta, ulp_errors
from vera_export.fold import VeraDelta, fold
from vera_export.guard import CancellationGuard
from vera_export.precision import ulp


@pytest.fixture
def repaired(monkeypatch) -> list[tuple[int, int]]:
    """The (row, column) of every element the guard sends to `repair`, filled in as folds run."""
    noted: list[tuple[int, int]] = []
    real_repair = CancellationGuard.repair

    def recording_repair(guard, out):
        noted.extend((int(i), int(j)) for part in guard.suspects for i, j in zip(part[0], part[1]))
        real_repair(guard, out)

    monkeypatch.setattr(CancellationGuard, "repair", recording_repair)
    return noted


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_few_cancelling_elements_in_a_large_weight_are_repaired(dtype, fan_in_fan_out, repaired) -> None:
    """The sparse path: a handful of suspects among many elements, recomputed from exact rows and columns.

    At each spot the weight is 0 and the delta's terms cancel among themselves (the projection's column is made
    orthogonal to the row's), so the sum is tiny next to its terms and the compute precision cannot vouch for it.
    """
    g = torch.Generator().manual_seed(5)
    rows, cols, r = 600, 300, 16
    n_in, n_out = (rows, cols) if fan_in_fan_out else (cols, rows)
    lambda_b, lambda_d = torch.rand(n_out, generator=g) + 0.5, torch.rand(r, generator=g) + 0.5
    vera_A, vera_B = torch.rand(r, n_in, generator=g) - 0.5, torch.rand(n_out, r, generator=g) - 0.5
    spots = [(0, 0), (17, 299), (511, 3), (512, 150), (599, 298)]
    for i, j in spots:  # orthogonalize the input-side column against the output-side row, in float64
        out_index, in_index = (j, i) if fan_in_fan_out else (i, j)
        u = lambda_b[out_index].double() * vera_B[out_index].double() * lambda_d.double()
        column = vera_A[:, in_index].double()
        vera_A[:, in_index] = (column - (column @ u) / (u @ u) * u).float()
    delta = VeraDelta(lambda_b, lambda_d, vera_A, vera_B, n_in, n_out, fan_in_fan_out)
    left, right = delta.factors()
    weight = (torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(dtype)
    for i, j in spots:
        weight[i, j] = 0.0
    merged = fold(weight, [delta])
    lf = [[Fraction(v) for v in left[i].tolist()] for i, _ in spots]
    rf = [[Fraction(v) for v in right[:, j].tolist()] for _, j in spots]
    exact = [[sum(a * b for a, b in zip(lf[n], rf[n]))] for n in range(len(spots))]
    picked = torch.stack([merged[i, j] for i, j in spots]).reshape(-1, 1)
    assert ulp_errors(picked, exact).max() <= 1.0
    if (
        dtype == torch.bfloat16
    ):  # float64's own bound is too tight to flag all of them; the result holds anyway
        assert set(spots) <= set(repaired)
    assert len(repaired) < weight.numel() // 100  # only a few
    reference = weight.double() + left @ right  # float64 is close enough away from the spots
    off = (merged.double() - reference).abs() > ulp(reference, dtype)
    assert {(int(i), int(j)) for i, j in off.nonzero()} <= set(spots)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_recompute_is_exact_for_factors_below_float32_range(dtype) -> None:
    """Factor entries near 1e-44 (lambda_b at float32's smallest normal times a 1e-6 projection entry) whose terms
    cancel exactly: the exact path must return 0, which needs every partial product to be exact."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lambda_b = (torch.rand(1, generator=g) + 1) * 1.2e-38
        entry = (torch.rand(1, generator=g) + 1) * 1e-6
        lambda_d = ((torch.rand(1, generator=g) + 1) * 1e30).repeat(2)
        a = (torch.rand(1, generator=g) + 1) * 0.3
        vera_A = torch.stack([a, -a / 2])  # (r=2, in=1): the two terms cancel exactly against vera_B's 1 : 2
        delta = VeraDelta(lambda_b, lambda_d, vera_A, torch.stack([entry, 2 * entry], dim=1), 1, 1)
        assert not delta.fits_float32()
        left, right = delta.factors()
        weight = torch.zeros(1, 1, dtype=dtype)
        assert ulp_errors(fold(weight, [delta]), exact_fold(weight, [(left, right)])).max() <= 1.0


@pytest.mark.parametrize("tiny_lambda", [False, True], ids=["float32 fold", "float64 fold"])
def test_a_sum_just_below_the_overflow_threshold_rounds_to_the_largest_value(tiny_lambda: bool) -> None:
    """65504 + (16 - 2**-20) is below float16's overflow threshold 65520: correctly rounded it is 65504. In float32
    the sum rounds up to 65520, and torch's float64 -> float16 conversion rounds twice; neither may give inf or
    an error."""
    vera_A = torch.tensor([[16 - 2.0**-20], [0.5]])
    lambda_d = torch.tensor(
        [1.0, 1e-39 if tiny_lambda else 0.0]
    )  # a tiny lambda makes the fold run in float64
    delta = VeraDelta(torch.ones(1), lambda_d, vera_A, torch.ones(1, 2), 1, 1)
    assert delta.fits_float32() is not tiny_lambda
    merged = fold(torch.tensor([[65504.0]], dtype=torch.float16), [delta])
    assert merged.item() == 65504.0


def test_a_sum_closer_to_the_overflow_threshold_than_float64_resolves_is_decided_exactly() -> None:
    """65504 + 16 - 2**-60 rounds to 65520 in float64, and so to inf; exactly it is below the threshold: 65504."""
    delta = VeraDelta(
        torch.ones(1), torch.ones(2), torch.tensor([[16.0], [-(2.0**-60)]]), torch.ones(1, 2), 1, 1
    )
    assert fold(torch.tensor([[65504.0]], dtype=torch.float16), [delta]).item() == 65504.0


def test_a_sum_past_the_overflow_threshold_is_refused() -> None:
    delta = VeraDelta(torch.ones(1), torch.ones(1), torch.tensor([[16.0]]), torch.ones(1, 1), 1, 1)
    with pytest.raises(FloatingPointError, match="overflows torch.float16 at row 0, column 0"):
        fold(torch.tensor([[65504.0]], dtype=torch.float16), [delta])


def test_a_nan_weight_does_not_hide_its_rows_cancelling_elements() -> None:
    """NaN stays NaN where the base has it, and the rest of its row is still guarded."""
    g = torch.Generator().manual_seed(5)
    rows, cols, r = 8, 300, 16
    lambda_b, lambda_d = torch.rand(rows, generator=g) + 0.5, torch.rand(r, generator=g) + 0.5
    vera_A, vera_B = torch.rand(r, cols, generator=g) - 0.5, torch.rand(rows, r, generator=g) - 0.5
    spots = [(i, 10 + i) for i in range(rows)]
    for i, j in spots:  # as above: delta[i, j] cancels to almost nothing
        u = lambda_b[i].double() * vera_B[i].double() * lambda_d.double()
        column = vera_A[:, j].double()
        vera_A[:, j] = (column - (column @ u) / (u @ u) * u).float()
    delta = VeraDelta(lambda_b, lambda_d, vera_A, vera_B, cols, rows)
    left, right = delta.factors()
    weight = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(torch.bfloat16)
    weight[:, 0] = float("nan")
    for i, j in spots:
        weight[i, j] = 0.0
    merged = fold(weight, [delta])
    assert merged[:, 0].isnan().all()
    exact = [
        [sum(Fraction(a) * Fraction(b) for a, b in zip(left[i].tolist(), right[:, j].tolist()))]
        for i, j in spots
    ]
    picked = torch.stack([merged[i, j] for i, j in spots]).reshape(-1, 1)
    assert ulp_errors(picked, exact).max() <= 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_delta_as_large_as_the_weights_folds_wide_within_one_ulp(
    dtype, fan_in_fan_out, monkeypatch
) -> None:
    """A quarter of the elements cancelling: the first block has so many suspects that the rest of the weight is
    folded in float64 (`fold_wide`); every element, NaN and Inf kept where the base has them, against exact."""
    widened = []
    real = CancellationGuard.fold_wide

    def spy(guard, weight, start, out):
        widened.append(start)
        real(guard, weight, start, out)

    monkeypatch.setattr(CancellationGuard, "fold_wide", spy)
    rows, cols, r = 24, 20, 8
    delta = random_delta(rows, cols, r, fan_in_fan_out, seed=3)
    left, right = delta.factors()
    weight = cancelling_weight(dtype, left, right, seed=3)
    weight[5, 7], weight[17, 2] = float("nan"), float("-inf")
    merged = fold(weight, [delta], block_rows=8)
    assert widened == [0, 8, 16]
    assert merged[5, 7].isnan() and merged[17, 2] == float("-inf")
    finite, checked = weight.clone(), merged.clone()
    finite[5, 7] = finite[17, 2] = checked[5, 7] = checked[17, 2] = 0.0
    errors = ulp_errors(checked, exact_fold(finite, [(left, right)]))
    errors[5, 7] = errors[17, 2] = 0.0
    assert errors.max() <= 1.0


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_wide_fold_sends_the_sums_float64_cannot_vouch_for_to_the_repair(fan_in_fan_out, repaired) -> None:
    """Spots in a weight folded wide where the weight is 0 and the delta's terms cancel exactly, in pairs:
    float64's sum is at best near 0 there, its bound flags them, and the repair gives the exact 0."""
    rows, cols, r = 24, 20, 8
    delta = random_delta(rows, cols, r, fan_in_fan_out, seed=3)
    delta.lambda_d[1::2] = delta.lambda_d[0::2]
    spots = [(2, 3), (5, 7), (21, 19)]  # two in one block of rows: the right rows' weights are repaired
    for i, j in spots:
        out_index, in_index = (j, i) if fan_in_fan_out else (i, j)
        delta.vera_B[out_index] = 1.0
        delta.vera_A[1::2, in_index] = -delta.vera_A[0::2, in_index]
    left, right = delta.factors()
    weight = cancelling_weight(torch.bfloat16, left, right, seed=3)
    for i, j in spots:
        weight[i, j] = 0.0
    merged = fold(weight, [delta], block_rows=8)
    assert set(spots) <= set(repaired) and len(repaired) < weight.numel() // 20
    assert all(merged[i, j] == 0 for i, j in spots)
    assert ulp_errors(merged, exact_fold(weight, [(left, right)])).max() <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_wide_fold_on_the_gpu_writes_a_cpu_output() -> None:
    """The merge folds on the GPU into the tensor it read (on the CPU): the float64 fold's rounding too."""
    delta = random_delta(24, 20, 8, False, seed=3)
    left, right = delta.factors()
    weight = cancelling_weight(torch.bfloat16, left, right, seed=3)
    on_gpu = VeraDelta(
        *(t.cuda() for t in (delta.lambda_b, delta.lambda_d, delta.vera_A, delta.vera_B)), 20, 24
    )
    merged = fold(weight.cuda(), [on_gpu], out=torch.empty_like(weight), block_rows=8)
    assert merged.device.type == "cpu"
    assert ulp_errors(merged, exact_fold(weight, [(left, right)])).max() <= 1.0


def test_a_wide_fold_still_refuses_a_sum_past_the_overflow_threshold() -> None:
    """In float64 the sum does not overflow; rounding it to float16 would: refused as in the float32 path."""
    g = torch.Generator().manual_seed(4)
    lambda_b, lambda_d = torch.ones(16), torch.ones(4)
    vera_A, vera_B = torch.rand(4, 16, generator=g) * 100 + 10, torch.rand(16, 4, generator=g) + 0.5
    delta = VeraDelta(lambda_b, lambda_d, vera_A, vera_B, 16, 16)
    left, right = delta.factors()
    weight = (-(left.double() @ right.double())).to(torch.float16)  # every element cancels: wide from block 0
    weight[9, 3] = 65504.0  # plus a delta of more than 16, past float16's threshold 65520
    with pytest.raises(FloatingPointError, match="overflows torch.float16 at row 9, column 3"):
        fold(weight, [delta], block_rows=4)
