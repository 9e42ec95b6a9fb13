"""ONNX Runtime CPU throughput of a bank graph: one mixed batch of 8 rows run by 8 different VeRA adapters.

Builds the random Llama of `onnx_latency.py` (hidden 512, 4 layers, vocabulary 8192) and 8 PEFT VeRA adapters on
every linear layer (r = 64 by default, random non-zero lambdas). Exports them with `vera_export.onnx` as one bank
(verified row by row against each adapter's unmerged model), one merged graph per adapter, and the first adapter in
adapter mode. Then times, on 2 threads, for each batch shape 8 x L:

- **bank**: the bank graph on the 8 rows, row i run by adapter i, in one call;
- **8 merged, batch 1**: the same 8 rows as 8 calls, row i to adapter i's merged graph (8 sessions);
- **adapter, batch 8**: the adapter-mode graph on the 8 rows, all run by one adapter;
- **merged, batch 8**: adapter 0's merged graph on the 8 rows: the floor of one forward pass.

Rounds are interleaved (each engine once per round, after two warm-up rounds); the table gives medians.

    python benchmarks/onnx_bank.py [--r 64] [--lengths 1 4 16 128] [--rounds 20] [--work DIR]
"""

from __future__ import annotations

import os

# Idle threads of one engine must not spin while another runs (see onnx_latency.py). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx_latency import LLAMA, _session, build_adapter, build_base, machine, settle, time_interleaved

from vera_export import OnnxOptions, export_onnx
from vera_export.onnx.graph import MODEL_NAME
from vera_export.onnx.signature import ADAPTER_INDEX

ADAPTERS = 8


def export(base: Path, adapters: list[Path], out: Path, mode: str, verify: bool) -> Path:
    started = time.perf_counter()
    report = export_onnx(base, adapters, out, OnnxOptions(mode=mode, verify=verify))
    seconds = time.perf_counter() - started
    if report.verification is None:
        print(f"{out.name}: exported in {seconds:.0f} s (not verified)")
    else:
        worst = max(c.max_abs_error / c.tolerance for c in report.verification.checks if c.tolerance)
        verdict = "passed" if report.verification.passed else "FAILED"
        print(
            f"{out.name}: exported and verified in {seconds:.0f} s, {verdict}, worst output at {worst:.2f} of "
            f"its tolerance"
        )
    return report.output / MODEL_NAME


def engines(work: Path, base: Path, r: int) -> dict[str, Callable[[dict[str, np.ndarray]], object]]:
    """Name -> function running the mixed batch (with `adapter_index` = 0..7)."""
    adapters = [build_adapter(base, r, seed=1 + k, out=work / f"vera-r{r}-{k}") for k in range(ADAPTERS)]
    bank = _session(export(base, adapters, work / f"bank-r{r}", "bank", verify=True))
    single = _session(export(base, adapters[:1], work / f"adapter-r{r}", "adapter", verify=False))
    merged = [
        _session(export(base, [adapter], work / f"merged-r{r}-{k}", "merged", verify=k == 0))
        for k, adapter in enumerate(adapters)
    ]

    def separately(batch: dict[str, np.ndarray]) -> object:
        return [
            session.run(None, {name: batch[name][k : k + 1] for name in ("input_ids", "attention_mask")})
            for k, session in enumerate(merged)
        ]

    def without_index(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: batch[name] for name in ("input_ids", "attention_mask")}

    return {
        "bank": lambda batch: bank.run(None, batch),
        "8 merged, batch 1": separately,
        "adapter, batch 8": lambda batch: single.run(None, without_index(batch)),
        "merged, batch 8": lambda batch: merged[0].run(None, without_index(batch)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 4, 16, 128])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--work", type=Path, help="keep the models and graphs here (default: a temporary directory)"
    )
    args = parser.parse_args()
    settle()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        runs = engines(work, build_base(work / "llama"), args.r)
        rows = []
        for length in args.lengths:
            rng = np.random.default_rng(0)
            batch = {
                "input_ids": rng.integers(0, LLAMA["vocab_size"], (ADAPTERS, length), dtype=np.int64),
                "attention_mask": np.ones((ADAPTERS, length), dtype=np.int64),
                ADAPTER_INDEX: np.arange(ADAPTERS, dtype=np.int64),
            }
            rows.append((length, time_interleaved(runs, batch, args.rounds)))
    print(f"\nMachine: {machine()}\n")
    names = list(rows[0][1])
    print(
        f"r = {args.r}, {ADAPTERS} adapters, {args.rounds} rounds; medians in ms per batch of {ADAPTERS} rows\n"
    )
    print(
        "| batch x seq | "
        + " | ".join(f"{n} (ms)" for n in names)
        + " | bank throughput / 8 merged | bank / adapter, batch 8 | batching bound |"
    )
    print("|---|" + "---|" * len(names) + "---|---|---|")
    for length, medians in rows:
        cells = " | ".join(f"{1e3 * medians[n]:.2f}" for n in names)
        speedup = medians["8 merged, batch 1"] / medians["bank"]
        cost = medians["bank"] / medians["adapter, batch 8"]
        # What batching the 8 rows gains for the merged model itself: no batched graph does better.
        bound = medians["8 merged, batch 1"] / medians["merged, batch 8"]
        print(f"| {ADAPTERS}x{length} | {cells} | {speedup:.2f} | {cost:.2f} | {bound:.2f} |")


if __name__ == "__main__":
    main()
