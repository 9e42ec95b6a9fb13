"""Time `vera-export merge` against the PEFT path, side by side, as whole processes; write benchmarks/RESULTS.md.

    python benchmarks/merge_bench.py [--workdir /tmp/vera-export-bench] [--rounds 3] [--baseline TREE]

Builds (once) a TinyLlama-1.1B-shaped bf16 checkpoint with an all-linear r=256 VeRA adapter, and an 8-layer
sibling (benchmarks/make_checkpoint.py). Each round runs every candidate once, in an order rotated per round so
that no candidate always runs first or last; wall time comes from the parent, peak RSS from wait4's rusage of the
child. Before each run its inputs are read once, so every candidate starts with them in the page cache (this VM
evicts them between runs otherwise), and outputs are written without fsync (as transformers' save_pretrained
does). Reported: best and median wall, best peak RSS, and ratios. With `--baseline TREE` (a checkout of another
version, e.g. `git worktree add /tmp/before HEAD~3`), that version's merge runs interleaved with the others, from
its own source tree, on the same inputs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from make_checkpoint import ensure  # noqa: E402


@dataclass
class Candidate:
    name: str
    command: list[str]
    inputs: list[Path]
    output: Path
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)


def warm(directories: list[Path]) -> None:
    """Read every file of `directories`, to start a run with them in the page cache."""
    for directory in directories:
        for path in directory.iterdir():
            with path.open("rb") as f:
                while f.read(1 << 24):
                    pass


def run(candidate: Candidate) -> None:
    shutil.rmtree(candidate.output, ignore_errors=True)
    warm(candidate.inputs)
    started = time.perf_counter()
    process = subprocess.Popen(candidate.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{candidate.name} failed: {process.stderr.read().decode()[-2000:]}")
    candidate.walls.append(wall)
    candidate.rss.append(usage.ru_maxrss * 1024)
    shutil.rmtree(candidate.output, ignore_errors=True)


def candidates(workdir: Path, baseline: Path | None = None) -> list[Candidate]:
    base22, adapter22 = ensure(workdir, 22)
    base8, adapter8 = ensure(workdir, 8)
    python = sys.executable

    def ours(base: Path, adapter: Path, out: str) -> list[str]:
        return [
            python,
            "-m",
            "vera_export",
            "merge",
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--output",
            str(workdir / out),
            "--quiet",
        ]

    bare_loop = (
        "import sys; from vera_export import merge, MergeOptions; "
        "merge(sys.argv[1], [sys.argv[2]], sys.argv[3], MergeOptions(progress=False, overlap=False))"
    )
    inputs22, inputs8 = [base22, adapter22], [base8, adapter8]
    extra = []
    if baseline is not None:
        # The baseline tree first on sys.path: its vera_export, not this one (checked in the run's stderr).
        code = f"import sys; sys.path.insert(0, {str(baseline)!r}); from vera_export.cli import main; main()"
        command = [python, "-c", code, *ours(base22, adapter22, "out-baseline")[3:]]
        commit = subprocess.run(
            ["git", "-C", str(baseline), "log", "-1", "--format=%h %s"], capture_output=True, text=True
        ).stdout.strip()
        name = f"baseline ({commit or baseline.name})"
        extra.append(Candidate(name, command, inputs22, workdir / "out-baseline"))
    return [
        Candidate("vera-export merge", ours(base22, adapter22, "out-ours"), inputs22, workdir / "out-ours"),
        Candidate(
            "vera-export, no overlap (bare loop)",
            [python, "-c", bare_loop, str(base22), str(adapter22), str(workdir / "out-bare")],
            inputs22,
            workdir / "out-bare",
        ),
        Candidate(
            "PEFT path",
            [python, str(HERE / "peft_merge.py"), str(base22), str(adapter22), str(workdir / "out-peft")],
            inputs22,
            workdir / "out-peft",
        ),
        Candidate(
            "vera-export merge, 8 layers",
            ours(base8, adapter8, "out-ours-8"),
            inputs8,
            workdir / "out-ours-8",
        ),
        *extra,
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )


def report(results: list[Candidate], rounds: int) -> str:
    ours, bare, peft, ours8, *baseline = results
    lines = [
        "# Merge benchmark",
        "",
        f"Machine: {machine()}.",
        "",
        "TinyLlama-1.1B-shaped random bf16 checkpoint (22 layers, hidden 2048, intermediate 5632, 32 heads, 4 KV heads,",
        "vocab 32000, three shards of at most 1 GB), all-linear VeRA adapter (q, k, v, o, gate, up, down; r=256; stored",
        "projections; lambda_b ~ N(0, 0.01), lambda_d ~ 0.1 + N(0, 0.05), a weak adapter). "
        f"{rounds} rounds, candidates interleaved;",
        "each run is a whole process.",
        "Inputs read into the page cache before each run, outputs written without fsync. Produced by",
        "`python benchmarks/merge_bench.py`.",
        "",
        "| candidate | best wall (s) | median wall (s) | peak RSS (MiB) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for c in results:
        lines.append(
            f"| {c.name} | {min(c.walls):.2f} | {statistics.median(c.walls):.2f} | {min(c.rss) / 2**20:.0f} |"
        )
    wall_ratio = min(ours.walls) / min(peft.walls)
    median_ratio = statistics.median(ours.walls) / statistics.median(peft.walls)
    round_ratio = statistics.median(a / b for a, b in zip(ours.walls, peft.walls))
    rss_ratio = min(ours.rss) / min(peft.rss)
    growth = min(ours.rss) / min(ours8.rss)
    overlap = min(ours.walls) / min(bare.walls)
    lines += [
        "",
        "| ratio | value | target |",
        "| --- | ---: | --- |",
        f"| wall, vera-export / PEFT path (best) | {wall_ratio:.2f} | <= 0.40 ({'met' if wall_ratio <= 0.40 else 'missed'}) |",
        f"| wall, vera-export / PEFT path (median) | {median_ratio:.2f} | <= 0.40 ({'met' if median_ratio <= 0.40 else 'missed'}) |",
        f"| wall, vera-export / PEFT path (median of the rounds' ratios) | {round_ratio:.2f} | <= 0.40 "
        f"({'met' if round_ratio <= 0.40 else 'missed'}) |",
        f"| peak RSS, vera-export / PEFT path | {rss_ratio:.2f} | <= 0.30 ({'met' if rss_ratio <= 0.30 else 'missed'}) |",
        f"| peak RSS, 22 layers / 8 layers | {growth:.2f} | <= 1.2 ({'met' if growth <= 1.2 else 'missed'}) |",
        f"| wall, overlapped / bare loop | {overlap:.2f} | < 1 (overlap beats the sequential floor) |",
    ]
    for other in baseline:
        best = min(ours.walls) / min(other.walls)
        per_round = statistics.median(a / b for a, b in zip(ours.walls, other.walls))
        lines.append(
            f"| wall, this tree / {other.name} (best; median of rounds) | {best:.2f}; {per_round:.2f} | about 1 |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vera-export-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--baseline", type=Path, help="source tree of another version to run side by side")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    results = candidates(args.workdir, args.baseline)
    for round_number in range(args.rounds):
        order = results[round_number % len(results) :] + results[: round_number % len(results)]
        for candidate in order:
            run(candidate)
            print(
                f"round {round_number + 1}: {candidate.name}: {candidate.walls[-1]:.2f} s, {candidate.rss[-1] / 2**20:.0f} MiB",
                flush=True,
            )
    text = report(results, args.rounds)
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
