"""Time `vera-export merge` against the PEFT path, side by side, as whole processes; write benchmarks/RESULTS.md.

    python benchmarks/merge_bench.py [--rounds 3] [--load 2] [--avx2] [--baseline TREE] [--workdir DIR]

Builds (once) TinyLlama-1.1B-shaped bf16 checkpoints of 8 and 22 layers and all-linear r=256 VeRA adapters of
several strengths (benchmarks/make_checkpoint.py), then measures:

- a strength sweep on 8 layers: for each adapter, vera-export and the PEFT path (transformers `from_pretrained`,
  `merge_and_unload`, `save_pretrained`);
- 22 layers with the weak adapter: both again, `verify --layers-only` of the merge (every element), and the merge
  without overlap (the bare read-fold-write loop); peak RSS against 8 layers;
- with `--load N`, the sweep again with N CPU-bound processes running beside it (started and stopped here);
- with `--avx2`, the sweep again with torch, MKL and oneDNN restricted to AVX2 (the dispatch of CPUs without
  AVX-512);
- the floor: the fold's matrix products at this machine's float32 rate (blocks of 512 rows, as the fold runs them),
  plus copying the checkpoint's bytes (read and write, page cache to page cache), plus starting Python with torch.

Each round runs every candidate once, in an order rotated per round; wall time comes from the parent, peak RSS
from wait4's rusage of the child. Before each run its inputs are read once, so every candidate starts with them in
the page cache, and outputs are written without fsync (as `save_pretrained` does). With `--baseline TREE` (a
checkout of another version, e.g. `git worktree add /tmp/before HEAD~3`), that version's merge runs interleaved
with the others on the 8-layer weak adapter. Check the load average first: other jobs distort every ratio.
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from make_checkpoint import STRENGTHS, TARGETS, ensure, llama_config, tensor_shapes  # noqa: E402

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
RANK = 256


@dataclass
class Candidate:
    name: str
    command: list[str]
    inputs: list[Path]
    output: Path
    env: dict[str, str] = field(default_factory=dict)
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.walls)


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
    process = subprocess.Popen(
        candidate.command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **candidate.env},
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{candidate.name} failed: {process.stderr.read().decode()[-2000:]}")
    candidate.walls.append(wall)
    candidate.rss.append(usage.ru_maxrss * 1024)
    shutil.rmtree(candidate.output, ignore_errors=True)


def measure(candidates: list[Candidate], rounds: int, label: str) -> None:
    for number in range(rounds):
        shift = number % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            run(candidate)
            print(
                f"{label} round {number + 1}: {candidate.name}: {candidate.walls[-1]:.2f} s, "
                f"{candidate.rss[-1] / 2**20:.0f} MiB",
                flush=True,
            )


# A CPU-bound loop that ends with the benchmark, even when that is killed.
_BUSY = "import os, sys\nwhile os.getppid() == int(sys.argv[1]):\n    for _ in range(10**6): pass"


@contextmanager
def load(processes: int):
    """`processes` CPU-bound busy loops running beside whatever runs inside."""
    busy = [subprocess.Popen([sys.executable, "-c", _BUSY, str(os.getpid())]) for _ in range(processes)]
    try:
        time.sleep(1)
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def ours(base: Path, adapter: Path, output: Path, name: str, env: dict | None = None) -> Candidate:
    command = [sys.executable, "-m", "vera_export", "merge", "--base", str(base), "--adapter", str(adapter)]
    command += ["--output", str(output), "--quiet"]
    return Candidate(name, command, [base, adapter], output, env or {})


def peft(base: Path, adapter: Path, output: Path, name: str, env: dict | None = None) -> Candidate:
    command = [sys.executable, str(HERE / "peft_merge.py"), str(base), str(adapter), str(output)]
    return Candidate(name, command, [base, adapter], output, env or {})


def sweep(workdir: Path, tag: str, env: dict | None = None) -> list[tuple[str, Candidate, Candidate]]:
    pairs = []
    for name, strength in STRENGTHS.items():
        base, adapter = ensure(workdir, 8, strength, name)
        slug = f"{tag}-{adapter.name}"
        pairs.append(
            (
                name,
                ours(base, adapter, workdir / f"out-ours-{slug}", f"vera-export, {name}", env),
                peft(base, adapter, workdir / f"out-peft-{slug}", f"PEFT path, {name}", env),
            )
        )
    return pairs


def floor(workdir: Path) -> tuple[float, float, float]:
    """Seconds for the fold's products (8 layers, float32, blocks of 512 rows), for copying the 8-layer
    checkpoint's bytes, and for starting Python with torch: what no merge of that model can go below."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    shapes = _shapes8()
    best_gemm = float("inf")
    for _ in range(3):
        seconds = 0.0
        for rows, cols in shapes:
            left, right = torch.randn(rows, RANK), torch.randn(RANK, cols)
            out = torch.empty(min(512, rows), cols)
            started = time.perf_counter()
            for start in range(0, rows, 512):
                stop = min(start + 512, rows)
                torch.mm(left[start:stop], right, out=out[: stop - start])
            seconds += time.perf_counter() - started
        best_gemm = min(best_gemm, seconds)
    base, _ = ensure(workdir, 8)
    target = workdir / "copy-floor"
    best_copy = float("inf")
    for _ in range(2):
        shutil.rmtree(target, ignore_errors=True)
        warm([base])
        started = time.perf_counter()
        shutil.copytree(base, target)
        best_copy = min(best_copy, time.perf_counter() - started)
    shutil.rmtree(target, ignore_errors=True)
    best_start = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, safetensors"], check=True)
        best_start = min(best_start, time.perf_counter() - started)
    return best_gemm, best_copy, best_start


def _shapes8() -> list[tuple[int, int]]:
    """The adapted weights' shapes of the 8-layer model."""
    return [s for n, s in tensor_shapes(llama_config(8)).items() if n.split(".")[-2] in TARGETS]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = ", ".join(f for f in ("avx2", "avx512f", "amx_tile") if f in have)
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu} ({flags}), {os.cpu_count()} cores, {memory:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def sweep_table(
    pairs: list[tuple[str, Candidate, Candidate]], quiet: dict[str, float] | None = None
) -> list[str]:
    header = "| adapter | vera-export best (s) | PEFT best (s) | ratio | median of rounds' ratios |"
    lines = [header, "| --- | ---: | ---: | ---: | ---: |"]
    if quiet is not None:
        lines[0] = header + " quiet ratio | against quiet |"
        lines[1] += " ---: | ---: |"
    for name, a, b in pairs:
        ratio = a.best / b.best
        per_round = statistics.median(x / y for x, y in zip(a.walls, b.walls))
        row = f"| {name} | {a.best:.2f} | {b.best:.2f} | {ratio:.2f} | {per_round:.2f} |"
        if quiet is not None:
            row += f" {quiet[name]:.2f} | {ratio / quiet[name]:.2f} |"
        lines.append(row)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vera-export-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", type=int, default=0, help="also measure beside N CPU-bound processes")
    parser.add_argument("--avx2", action="store_true", help="also measure with the AVX2 dispatch")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--baseline", type=Path, help="source tree of another version to run side by side")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started_load = os.getloadavg()[0]
    print(f"load average before: {started_load:.2f} on {os.cpu_count()} CPUs", flush=True)

    pairs = sweep(args.workdir, "quiet")
    base8, weak8 = ensure(args.workdir, 8, STRENGTHS["weak"], "weak")
    base22, weak22 = ensure(args.workdir, 22, STRENGTHS["weak"], "weak")
    bare_loop = (
        "import sys; from vera_export import merge, MergeOptions; "
        "merge(sys.argv[1], [sys.argv[2]], sys.argv[3], MergeOptions(progress=False, overlap=False))"
    )
    deep = [
        ours(base22, weak22, args.workdir / "out-ours-22", "vera-export, 22 layers"),
        peft(base22, weak22, args.workdir / "out-peft-22", "PEFT path, 22 layers"),
        Candidate(
            "vera-export verify --layers-only, 22 layers",
            [
                sys.executable,
                "-m",
                "vera_export",
                "verify",
                "--base",
                str(base22),
                "--adapter",
                str(weak22),
                "--merged",
                str(args.workdir / "merged-22"),
                "--layers-only",
                "--quiet",
            ],
            [base22, weak22, args.workdir / "merged-22"],
            args.workdir / "verify-has-no-output",
        ),
        Candidate(
            "vera-export, 22 layers, no overlap (bare loop)",
            [sys.executable, "-c", bare_loop, str(base22), str(weak22), str(args.workdir / "out-bare")],
            [base22, weak22],
            args.workdir / "out-bare",
        ),
    ]
    extra = []
    if args.baseline is not None:
        # The baseline tree first on sys.path: its vera_export, not this one.
        code = f"import sys; sys.path.insert(0, {str(args.baseline)!r}); from vera_export.cli import main; main()"
        candidate = ours(base8, weak8, args.workdir / "out-baseline", "")
        candidate.command = [sys.executable, "-c", code, *candidate.command[3:]]
        commit = subprocess.run(
            ["git", "-C", str(args.baseline), "log", "-1", "--format=%h"], capture_output=True, text=True
        ).stdout.strip()
        candidate.name = f"baseline {commit or args.baseline.name}, weak"
        extra.append(candidate)
    if not (args.workdir / "merged-22" / "config.json").is_file():  # what the verify candidate checks
        shutil.rmtree(args.workdir / "merged-22", ignore_errors=True)
        subprocess.run(
            [*deep[0].command[:-3], "--output", str(args.workdir / "merged-22"), "--quiet"], check=True
        )
    quiet_candidates = [c for _, a, b in pairs for c in (a, b)] + deep + extra
    measure(quiet_candidates, args.rounds, "quiet")
    gemm, copy, start = floor(args.workdir)

    loaded = sweep(args.workdir, "load") if args.load else []
    if loaded:
        with load(args.load):
            measure([c for _, a, b in loaded for c in (a, b)], args.rounds, f"load {args.load}")
    avx2 = sweep(args.workdir, "avx2", AVX2) if args.avx2 else []
    if avx2:
        measure([c for _, a, b in avx2 for c in (a, b)], args.rounds, "avx2")

    lines = [
        "# Merge benchmark",
        "",
        f"Machine: {machine()}. Load average {started_load:.2f} when the run began.",
        "",
        "TinyLlama-1.1B-shaped random bf16 checkpoints (hidden 2048, intermediate 5632, 32 heads, 4 KV heads, "
        "vocabulary 32000, shards of at most 1 GB, weights N(0, 0.02)), all-linear VeRA adapters (q, k, v, o, gate, "
        f"up, down; r = {RANK}; stored projections). {args.rounds} rounds, candidates interleaved, each run a "
        "whole process, inputs read into the page cache before each run, outputs written without fsync. Produced "
        "by `python benchmarks/merge_bench.py"
        + (f" --load {args.load}" if args.load else "")
        + (" --avx2" if args.avx2 else "")
        + "`.",
        "",
        "Adapters:",
        "",
        *[f"- {name}: {strength.describe()}" for name, strength in STRENGTHS.items()],
        "",
        "## Strength sweep, 8 layers, quiet machine",
        "",
        *sweep_table(pairs),
    ]
    merged_bytes = sum(p.stat().st_size for p in base8.iterdir())
    total_floor = gemm + copy + start
    lines += [
        "",
        f"Floor for 8 layers: the fold's products {gemm:.2f} s (float32, blocks of 512 rows, "
        f"{2 * RANK * sum(r * c for r, c in _shapes8()) / gemm / 1e9:.0f} GFLOP/s), copying the checkpoint's "
        f"{merged_bytes / 1e9:.2f} GB {copy:.2f} s, starting Python with torch {start:.2f} s: {total_floor:.2f} s.",
        "",
        "| adapter | vera-export / floor |",
        "| --- | ---: |",
        *[f"| {name} | {a.best / total_floor:.2f} |" for name, a, _ in pairs],
        "",
        "## 22 layers, weak adapter",
        "",
        "| candidate | best wall (s) | median wall (s) | peak RSS (MiB) |",
        "| --- | ---: | ---: | ---: |",
        *[
            f"| {c.name} | {c.best:.2f} | {statistics.median(c.walls):.2f} | {min(c.rss) / 2**20:.0f} |"
            for c in deep
        ],
        "",
        f"- wall, vera-export / PEFT path: {deep[0].best / deep[1].best:.2f}",
        f"- peak RSS, vera-export / PEFT path: {min(deep[0].rss) / min(deep[1].rss):.2f}",
        f"- peak RSS, 22 layers / 8 layers: {min(deep[0].rss) / min(pairs[0][1].rss):.2f}",
        f"- wall, verify --layers-only / merge: {deep[2].best / deep[0].best:.2f}",
        f"- wall, overlapped / bare loop: {deep[0].best / deep[3].best:.2f}",
    ]
    for other in extra:
        lines.append(
            f"- wall, this tree / {other.name} (8 layers, weak; {other.best:.2f} s): "
            f"{pairs[0][1].best / other.best:.2f}"
        )
    quiet_ratios = {name: a.best / b.best for name, a, b in pairs}
    if loaded:
        lines += [
            "",
            f"## Strength sweep, 8 layers, beside {args.load} CPU-bound processes",
            "",
            "Both candidates under the same load; the last column is the loaded ratio over the quiet one.",
            "",
            *sweep_table(loaded, quiet_ratios),
        ]
    if avx2:
        lines += [
            "",
            "## Strength sweep, 8 layers, AVX2 dispatch",
            "",
            f"Both candidates with {', '.join(f'{k}={v}' for k, v in AVX2.items())}.",
            "",
            *sweep_table(avx2),
        ]
    text = "\n".join(lines) + "\n"
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
