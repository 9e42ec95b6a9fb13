"""Check a merged checkpoint against the unmerged VeRA model: the CI gate.

Two kinds of checks, both in the fold's compute precision (float32 for 16-bit weights, float64 for float32):

- **Layers**, streaming, for a model of any size. For each adapted weight `W'`, with the base weight `W` and the
  adapter's path `x -> lambda_b * (B_s (lambda_d * (A_s x)))`:
  *probes*: `W' x` against `W x + adapter(x)` for Gaussian probe vectors `x`. A correctly merged weight differs
  from `W + delta_W` only by per-element rounding, so each output's error is Gaussian with standard deviation at
  most `sigma = sqrt(sum_j ulp(W'_ij)^2)`; the check fails above 8 sigma (a false alarm has odds below 1e-14).
  *elements*: every element of `W'` against `W + delta_W` computed in the fold's precision, block by block of rows;
  each may be off by at most `ulp(W')` plus the error bound of computing the sum in float32 (as PEFT computes
  `delta_W` before adding it).
- **Model**, when it fits in memory: the merged model's outputs against the unmerged VeRA model's (base model plus
  `layers.VeraLinear`, which computes what PEFT computes) on fixed inputs of two shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import VeraAdapter, load_adapter
from .checks import Check
from .errors import counted, listing
from .io.index import ShardedTensorIndex
from .io.loader import LazyTensorLoader, same_bytes
from .io.locations import Kind, locate
from .model_check import ModelCheckSkipped, check_model_outputs, fits_in_memory
from .names import model_names
from .options import VerifyOptions
from .plan import LayerDelta, build_plan, pin_projections
from .precision import all_finite, compute_dtype, gamma, ulp
from .progress import progress_bar
from .provenance import Record, describe_adapter, shown_record
from .reports import JsonFields

PROBES = 4
SIGMAS = 8.0
ROWS = 256  # rows of W' compared exactly at a time
_GATHERED = 4096  # up to this many elements per block, the float32 bound is worked out element by element


@dataclass
class VerifyReport(JsonFields):
    """All checks of one verification; `passed` only if every check passed."""

    command: str = field(default="verify", repr=False)
    checks: list[Check] = field(default_factory=list)
    record: dict | None = None  # the merged checkpoint's provenance record, when it carries one
    warnings: list[str] = field(default_factory=list)
    json_properties = ("passed",)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    @property
    def ok(self) -> bool:
        return self.passed

    def summary(self) -> str:
        failed = sum(not c.passed for c in self.checks)
        if self.passed:
            return f"verification PASSED: {counted(len(self.checks), 'check')}"
        if not self.checks:
            return "verification FAILED: nothing was checked"
        return f"verification FAILED: {failed} of {counted(len(self.checks), 'check')} failed"

    def text(self, quiet: bool = False) -> str:
        lines = [check.line() for check in self.checks if not quiet or not check.passed]
        if self.record is not None:
            lines.append(f"record: {Record.from_json(self.record).summary()}")
        return "\n".join([*lines, self.summary()])


def verify(
    base: str | Path,
    adapters: Sequence[str | Path | VeraAdapter],
    merged: str | Path,
    options: VerifyOptions = VerifyOptions(),
) -> VerifyReport:
    """Verify a merged checkpoint against the base plus the adapters, unmerged.

    Args:
        base: The base model directory.
        adapters: The adapters that were merged, in order.
        merged: The merged model directory.
        options: See `VerifyOptions`.

    Returns:
        The report; `report.passed` is the verdict. Inputs that cannot be compared at all raise instead.
    """
    base, merged = locate(base, Kind.BASE), locate(merged, Kind.MERGED)
    loaded = [load_adapter(a, options.allow_pickle) for a in adapters]
    full_model = options.full_model
    merged_index = ShardedTensorIndex.from_dir(merged)
    names = model_names(base, ShardedTensorIndex.from_dir(base), loaded)
    base_index = names.output
    report = VerifyReport()
    _read_record(merged, merged_index, loaded, report)
    report.checks.append(_check_structure(base_index, merged_index))
    if not report.checks[0].passed:
        return report
    plan = build_plan(loaded, names.index.tensors, options.rounding)
    plan.check_base_copies(names.index.tensors)
    plan = names.to_checkpoint(plan)
    report.warnings.extend(plan.warnings)
    copied = [
        name for name in base_index.tensors if name not in plan.deltas and name not in plan.replacements
    ]
    total = sum(info.nbytes for info in base_index.tensors.values())
    with LazyTensorLoader() as loader, progress_bar(total, "verifying", options.progress) as advance:
        for name, deltas in plan.deltas.items():
            base_weight = loader.load(base_index.tensors[name])
            merged_weight = loader.load(merged_index.tensors[name])
            report.checks.append(check_layer(name, base_weight, merged_weight, deltas))
            advance(base_index.tensors[name].nbytes)
        for name, tensor in plan.replacements.items():
            report.checks.append(_check_replacement(name, tensor, loader.load(merged_index.tensors[name])))
            advance(base_index.tensors[name].nbytes)
        report.checks.append(_check_copied(base_index, merged_index, copied, advance))
    if full_model is None:
        full_model = fits_in_memory(base_index)
        if not full_model:
            report.warnings.append("model outputs not compared: two copies of the model do not fit in memory")
    if full_model:
        try:
            report.checks.extend(
                check_model_outputs(base, pin_projections(loaded, plan), merged, options.rounding)
            )
        except ModelCheckSkipped as skipped:
            report.warnings.append(f"model outputs not compared: {skipped}")
    return report


def _read_record(
    merged: Path, index: ShardedTensorIndex, adapters: list[VeraAdapter], report: VerifyReport
) -> None:
    """Show the merged checkpoint's record, and warn where it disagrees with the adapters given (the numbers,
    not the record, decide the verdict)."""
    record = shown_record(index, report.warnings)
    if record is None:
        return
    report.record = record.to_json()
    unlisted = [
        str(a.path) for a in adapters if a.weights_file is not None and not record.lists(describe_adapter(a))
    ]
    if unlisted:
        report.warnings.append(
            f"{merged}: its vera-export record does not list {listing(unlisted)} among the adapters merged in"
        )


@torch.no_grad()
def check_layer(
    name: str, base_weight: torch.Tensor, merged_weight: torch.Tensor, deltas: Sequence[LayerDelta]
) -> Check:
    """Compare one merged weight with its base weight plus the adapters' deltas (see the module docstring).

    Block by block of `ROWS` rows, so that nothing of the weight's size is held in float64.
    """
    dtype = compute_dtype(base_weight.dtype)
    target = deltas[0].target
    # Work in the nn.Linear layout [out, in] whatever the storage layout.
    base_rows, merged_rows = (
        (base_weight.T, merged_weight.T) if target.fan_in_fan_out else (base_weight, merged_weight)
    )
    factors = [tuple(f.to(dtype) for f in _linear_factors(delta)) for delta in deltas]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((PROBES, target.in_features), generator=generator, dtype=torch.float64).to(dtype)
    projected = [x @ scaled_A.T for _, scaled_A in factors]
    probe_ratio = row_ratio = max_abs = worst_tolerance = 0.0
    scale, nonfinite, same_nonfinite = 0.0, 0, True
    for start in range(0, target.out_features, ROWS):
        W = base_rows[start : start + ROWS].to(dtype, memory_format=torch.contiguous_format)
        W_merged = merged_rows[start : start + ROWS].to(dtype, memory_format=torch.contiguous_format)
        # NaN or Inf in the base stay where they are (W + delta is not finite either): there the merged weight
        # must be the same, and the numbers are compared everywhere else.
        finite = None
        if not all_finite(W):
            finite = torch.isfinite(W)
            base_bad, merged_bad = W[~finite], W_merged[~finite]
            same_nonfinite &= bool(((merged_bad == base_bad) | (merged_bad.isnan() & base_bad.isnan())).all())
            nonfinite += int((~finite).sum())
            W, W_merged = W.masked_fill(~finite, 0), W_merged.masked_fill(~finite, 0)
        expected = x @ W.T
        for (scaled_B, _), px in zip(factors, projected):
            expected += px @ scaled_B[start : start + ROWS].T
        error = (x @ W_merged.T - expected).abs()
        if finite is not None:
            error *= finite.all(dim=1)  # rows with a non-finite weight: their elements are checked one by one
        spacing = ulp(W_merged, merged_weight.dtype)
        tolerance = SIGMAS * spacing.square().sum(dim=1).sqrt()
        ratios = error / tolerance
        worst = int(ratios.argmax())  # NaN counts as the largest
        ratio = _failing_nan(ratios.flatten()[worst].item())
        if ratio >= probe_ratio:
            probe_ratio, worst_tolerance = ratio, tolerance[worst % len(W)].item()
        max_abs = max(max_abs, _failing_nan(error.max().item()))
        scale = max(scale, expected.abs().max().item())
        row_ratio = max(row_ratio, _failing_nan(_rows_ratio(W, W_merged, spacing, factors, start, finite)))

    detail = f"probes at {probe_ratio:.2g} of their tolerance, elements at {row_ratio:.2g} of theirs"
    if nonfinite:
        where = "the same" if same_nonfinite else "NOT the same"
        detail += f"; {nonfinite} NaN or Inf elements of the base, {where} in the merged weight"
    return Check(
        name=f"layer {target.module}",
        max_abs_error=max_abs,
        max_rel_error=max_abs / (scale or 1.0),
        tolerance=worst_tolerance,
        passed=probe_ratio <= 1.0 and row_ratio <= 1.0 and same_nonfinite,
        detail=detail,
    )


def _failing_nan(value: float) -> float:
    """NaN as infinity, so that `max` and `<= 1` treat a NaN error as the failure it is."""
    return math.inf if math.isnan(value) else value


def _rows_ratio(
    W: torch.Tensor,
    W_merged: torch.Tensor,
    spacing: torch.Tensor,
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    start: int,
    compared: torch.Tensor | None,
) -> float:
    """The worst element of a block of rows of `W'` against `W + delta_W`, in units of its tolerance, over the
    elements `compared` says (all when None).

    `W + delta_W` is computed in `W`'s dtype, the fold's precision (float32 for 16-bit weights), from factors in
    that dtype. A merge may round the sum once, and may compute the delta in float32 first (PEFT does): an element
    may be off by its ulp plus the float32 error bound of the sum's terms, which also covers this computation's own
    error. That bound is only worked out for the elements more than an ulp off, which are few in a correct merge.
    The difference of two values within a few ulps of each other is exact in their dtype (Sterbenz).
    """
    stop = start + len(W)
    exact = W.clone()
    for scaled_B, scaled_A in factors:
        exact.addmm_(scaled_B[start:stop], scaled_A)
    difference = (W_merged - exact).abs_().double()
    if compared is not None:
        difference.masked_fill_(~compared, 0)
    if not difference.numel():
        return 0.0
    ratios = difference / spacing
    worst = ratios.max().item()
    if worst <= 1.0:
        return worst
    terms = sum(scaled_A.shape[0] for _, scaled_A in factors)
    i, j = (~(ratios <= 1.0)).nonzero().unbind(1)  # NaN included
    if len(i) > _GATHERED:  # a wrong merge: the bound for the whole block at once
        magnitude = sum(B[start:stop].abs() @ A.abs() for B, A in factors)[i, j]
    else:
        magnitude = sum((B[start:stop][i].abs() * A[:, j].T.abs()).sum(dim=1) for B, A in factors)
    bound = gamma(terms + 2, torch.float32) * (magnitude.double() + W[i, j].double().abs())
    return (difference[i, j] / (spacing[i, j] + bound)).max().item()


def _linear_factors(delta: LayerDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lambda_b * B_s, lambda_d * A_s)` in float64, shapes (out, r) and (r, in), whatever the storage layout."""
    left, right = delta.factors()
    return (right.T, left.T) if delta.target.fan_in_fan_out else (left, right)


def _check_structure(base: ShardedTensorIndex, merged: ShardedTensorIndex) -> Check:
    problems = []
    for name, info in base.tensors.items():
        other = merged.tensors.get(name)
        if other is None:
            problems.append(f"{name} missing")
        elif (other.dtype, other.shape) != (info.dtype, info.shape):
            problems.append(
                f"{name} is {other.dtype} {list(other.shape)}, base is {info.dtype} {list(info.shape)}"
            )
    problems += [f"{name} not in the base" for name in merged.tensors.keys() - base.tensors.keys()]
    return Check(
        name="tensor names, dtypes and shapes",
        max_abs_error=0.0,
        max_rel_error=0.0,
        tolerance=0.0,
        passed=not problems,
        detail="; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""),
    )


def _check_copied(
    base: ShardedTensorIndex, merged: ShardedTensorIndex, names: list[str], advance: Callable[[int], None]
) -> Check:
    """Every tensor the merge copies is the base's, byte for byte, read chunk by chunk at any model size."""
    differ = []
    for name in names:
        if not same_bytes(base.tensors[name], merged.tensors[name]):
            differ.append(name)
        advance(base.tensors[name].nbytes)
    size = sum(base.tensors[name].nbytes for name in names)
    detail = f"{counted(len(names), 'tensor')}, {size / 1e6:.1f} MB"
    if differ:
        detail += f"; differ: {listing(differ, 5)}"
    return Check("copied tensors equal the base's, byte for byte", 0.0, 0.0, 0.0, not differ, detail)


def _check_replacement(name: str, trained: torch.Tensor, merged: torch.Tensor) -> Check:
    expected = trained.to(merged.dtype)
    error = (merged.double() - expected.double()).abs().max().item() if merged.numel() else 0.0
    return Check(
        f"replaced {name}", error, error / (expected.double().abs().max().item() or 1.0), 0.0, error == 0.0
    )
