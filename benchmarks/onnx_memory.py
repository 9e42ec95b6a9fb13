"""Peak memory of `vera-export onnx`, stage by stage, in bytes per parameter of the base.

Exports the benchmark's TinyLlama-width bf16 model (benchmarks/make_checkpoint.py, 8 layers by default, about
480M parameters) with its all-linear r=256 adapter, once per mode, each in a fresh process, and samples the
process's resident memory every 20 ms, keyed by the export's stage (loading, tracing, optimizing, writing,
verifying). Memory does not drift with the machine's load as time does, so one run per mode is enough.

    python benchmarks/onnx_memory.py WORKDIR [--layers 8] [--modes merged adapter]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from make_checkpoint import ensure
from merge_bench import machine


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(base: Path, adapter: Path, mode: str, output: Path) -> dict[str, int]:
    """Peak resident bytes by stage of one export with verification, in this process."""
    import vera_export.onnx.export as export
    from vera_export import OnnxOptions, export_onnx

    stage, peaks, done = ["starting"], {}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks[stage[0]] = max(peaks.get(stage[0], 0), _rss())
            time.sleep(0.02)

    @contextlib.contextmanager
    def stages(names, label, progress):  # replaces the progress bar: each stage is recorded as it starts
        yield lambda name: stage.__setitem__(0, name)

    export.stage_bar = stages
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    report = export_onnx(base, [adapter], output, OnnxOptions(mode=mode, progress=False))
    done.set()
    sampler.join()
    if not report.ok:
        raise SystemExit(report.text())
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["merged", "adapter"])
    parser.add_argument("--child", nargs=3, metavar=("BASE", "ADAPTER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        base, adapter, mode = args.child
        with tempfile.TemporaryDirectory() as scratch:
            print(json.dumps(measure(Path(base), Path(adapter), mode, Path(scratch) / "onnx")))
        return

    from vera_export.io.index import ShardedTensorIndex

    base, adapter = ensure(args.workdir, args.layers)
    params = sum(math.prod(info.shape) for info in ShardedTensorIndex.from_dir(base).tensors.values())
    print(f"{machine()}; {args.layers} layers, {params / 1e6:.0f}M parameters, bf16 checkpoint, fp32 graph")
    print(
        "| mode | " + " | ".join(("loading", "tracing", "optimizing", "writing", "verifying")) + " | peak |"
    )
    print("| --- |" + " ---: |" * 6)
    for mode in args.modes:
        child = [sys.executable, __file__, str(args.workdir), "--child", str(base), str(adapter), mode]
        peaks = json.loads(
            subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        cells = [
            f"{peaks.get(s, 0) / params:.1f}"
            for s in ("loading", "tracing", "optimizing", "writing", "verifying")
        ]
        print(f"| {mode} | " + " | ".join(cells) + f" | {max(peaks.values()) / params:.1f} B/param |")


if __name__ == "__main__":
    main()
