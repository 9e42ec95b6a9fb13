"""Time the fold of one weight, this tree against another version of it, at every adapter strength.

    python benchmarks/fold_bench.py --baseline TREE [--rows 5632] [--cols 2048] [--rank 256] [--runs 7]

One TinyLlama-shaped bf16 weight (gate_proj: 5632 x 2048 by default, weights N(0, 0.02)), PEFT's projections
(rounded to bf16, as make_checkpoint.py stores them) and lambdas of every strength of make_checkpoint.py, folded in one process by this tree's `fold` and by the version in TREE
(a checkout, e.g. `git worktree add /tmp/before HEAD~3`), runs alternated, both stored and `fan_in_fan_out`
layouts. Prints the best time of each, the median of the runs' ratios, how many elements the two results differ
in (a change meant to be bit-identical must say 0) and the largest error against float64, in ulps. Whole merges
are measured by merge_bench.py; this isolates the fold from reading, writing and starting Python.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from make_checkpoint import STRENGTHS  # noqa: E402
from merge_bench import machine  # noqa: E402

import vera_export.fold as ours  # noqa: E402
from vera_export.plan import Projections  # noqa: E402
from vera_export.precision import ulp  # noqa: E402
from vera_export.projections import generate_projections  # noqa: E402


def _baseline(tree: Path, into: Path):
    """The fold module of the version in `tree`, imported as a package of another name beside ours."""
    shutil.copytree(tree / "vera_export", into / "vera_export_baseline")
    sys.path.insert(0, str(into))
    import vera_export_baseline.fold as theirs

    return theirs


def _delta(module, lambda_b, lambda_d, vera_A, vera_B, rows, cols, fan_in_fan_out):
    """`module`'s VeraDelta, with what the merge computes once per adapter (`plan.Projections`: the projections'
    bounds, and their squares where that version uses them) computed here, outside the timing."""
    in_features, out_features = (rows, cols) if fan_in_fan_out else (cols, rows)
    projections = Projections(vera_A, vera_B, stored=True)
    shared = {"projection_floor": projections.floor, "projection_ceiling": projections.ceiling}
    if "projection_squares" in module.VeraDelta.__dataclass_fields__:
        shared["projection_squares"] = projections.squares
    return module.VeraDelta(
        lambda_b, lambda_d, vera_A, vera_B, in_features, out_features, fan_in_fan_out, **shared
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", type=Path, required=True, help="source tree of the version to compare with"
    )
    parser.add_argument("--rows", type=int, default=5632)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(
        f"{machine()}\nweight {args.rows} x {args.cols}, bf16, r = {args.rank}, {args.runs} runs alternated\n"
    )
    with tempfile.TemporaryDirectory() as scratch:
        theirs = _baseline(args.baseline, Path(scratch))
        print(
            "| layout | adapter | this tree (ms) | baseline (ms) | median ratio | elements differing | max error (ulp) |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for fan_in_fan_out in (False, True):
            g = torch.Generator().manual_seed(0)
            rows, cols = (args.cols, args.rows) if fan_in_fan_out else (args.rows, args.cols)
            in_features, out_features = (rows, cols) if fan_in_fan_out else (cols, rows)
            weight = (torch.randn(rows, cols, generator=g) * 0.02).bfloat16()
            vera_A, vera_B = (
                p.bfloat16().float() for p in generate_projections(0, args.rank, in_features, out_features)
            )
            for name, strength in STRENGTHS.items():
                lambda_b, lambda_d = strength.lambdas(vera_A, vera_B, in_features, out_features, g)
                shape = (lambda_b, lambda_d, vera_A, vera_B, rows, cols, fan_in_fan_out)
                folds = {
                    "ours": (ours.fold, _delta(ours, *shape)),
                    "theirs": (theirs.fold, _delta(theirs, *shape)),
                }
                times: dict[str, list[float]] = {key: [] for key in folds}
                for run in range(args.runs):
                    for key in sorted(folds, reverse=bool(run % 2)):
                        fold, delta = folds[key]
                        started = time.perf_counter()
                        fold(weight, [delta])
                        times[key].append(time.perf_counter() - started)
                mine, other = (fold(weight, [delta]) for fold, delta in folds.values())
                left, right = folds["ours"][1].factors(torch.float64)
                errors = (mine.double() - (weight.double() + left @ right)).abs() / ulp(mine, torch.bfloat16)
                differing = (mine.view(torch.int16) != other.view(torch.int16)).sum().item()
                ratio = statistics.median(a / b for a, b in zip(times["ours"], times["theirs"]))
                layout = "[in, out]" if fan_in_fan_out else "[out, in]"
                print(
                    f"| {layout} | {name} | {min(times['ours']) * 1e3:.1f} | {min(times['theirs']) * 1e3:.1f} | "
                    f"{ratio:.2f} | {differing} | {errors.max().item():.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
