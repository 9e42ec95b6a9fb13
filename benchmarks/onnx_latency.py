"""ONNX Runtime CPU latency of a small VeRA decoder: merged graph, adapter-mode graph, PyTorch eager.

Builds a random Llama (hidden 512, 4 layers, vocabulary 8192) and, for each r, a PEFT VeRA adapter on every linear
layer with random non-zero lambdas; exports it with `vera_export.onnx` in both modes (each verified against the
unmerged model); then times, on 2 threads, ONNX Runtime running the merged graph, the adapter graph with its default
lambdas and with another adapter applied from an `.onnx_adapter` file, and PyTorch eager (PEFT's unmerged model).
Runs are interleaved (one of each engine per round) so that drift in the machine's speed hits all alike; the
table gives medians.

    python benchmarks/onnx_latency.py [--r 32 64 256] [--rounds 30] [--work DIR]
"""

from __future__ import annotations

import argparse
import os

# Idle threads of one engine must not spin while another runs: torch's OpenMP pool sleeps when idle, and so do
# ONNX Runtime's (see `_session`). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

from vera_export import OnnxOptions, export_onnx, onnx_adapter
from vera_export.onnx.graph import MODEL_NAME

THREADS = 2
SHAPES = [(1, 16), (1, 128), (4, 128), (8, 128)]
LLAMA = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=8192,
    max_position_embeddings=512,
)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(out: Path) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    model.save_pretrained(out)
    return out


def build_adapter(base: Path, r: int, seed: int, out: Path) -> Path:
    from peft import VeraConfig, get_peft_model

    model = transformers.LlamaForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, VeraConfig(r=r, target_modules=LINEAR))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "vera_lambda" in name:
                scale = 0.5 if "lambda_d" in name else 0.1
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out)
    return out


def peft_model(base: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    model = transformers.LlamaForCausalLM.from_pretrained(base)
    model.config.use_cache = False
    return PeftModel.from_pretrained(model, adapter).eval()


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def engines(work: Path, base: Path, r: int) -> dict[str, Callable[[dict[str, np.ndarray]], object]]:
    """Name -> function running one batch, for one r."""
    adapter = build_adapter(base, r, seed=1, out=work / f"vera-r{r}")
    other = build_adapter(base, r, seed=2, out=work / f"vera-r{r}-other")
    exported = {}
    for mode in ("merged", "adapter"):
        started = time.perf_counter()
        report = export_onnx(base, [adapter], work / f"onnx-r{r}-{mode}", OnnxOptions(mode=mode))
        worst = max(c.max_abs_error / c.tolerance for c in report.verification.checks if c.tolerance)
        print(
            f"r={r} {mode}: exported and verified in {time.perf_counter() - started:.0f} s, "
            f"{'passed' if report.verification.passed else 'FAILED'}, worst output at {worst:.2f} of tolerance"
        )
        exported[mode] = _session(report.output / MODEL_NAME)
    file = onnx_adapter(work / f"onnx-r{r}-adapter", other, work / f"other-r{r}.onnx_adapter").output
    lora = ort.LoraAdapter()
    lora.Load(str(file))
    swapped = ort.RunOptions()
    swapped.add_active_adapter(lora)
    eager = peft_model(base, adapter)

    def torch_run(batch: dict[str, np.ndarray]) -> object:
        with torch.no_grad():
            return eager(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits

    return {
        "ORT merged": lambda batch: exported["merged"].run(None, batch),
        "ORT adapter": lambda batch: exported["adapter"].run(None, batch),
        # `keep`: the LoraAdapter must outlive the runs, and RunOptions does not hold on to it.
        "ORT adapter + file": lambda batch, keep=lora: exported["adapter"].run(None, batch, swapped),
        "PyTorch eager (PEFT)": torch_run,
    }


def flop_ratio(r: int, length: int) -> float:
    """Multiply-adds per token of the adapter graph over the merged graph's, for this Llama.

    Each adapted layer adds `r * (in + out)`, except that `A_s x` is computed once for layers reading the same input
    (q / k / v, gate / up): the optimizer's common subexpression elimination shares it. Attention adds
    `2 * length * hidden` per layer to both graphs.
    """
    h, i, layers = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["num_hidden_layers"]
    kv = h // LLAMA["num_attention_heads"] * LLAMA["num_key_value_heads"]
    linear = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out) of q k v o gate up down
    merged = layers * (sum(a * b for a, b in linear) + 2 * length * h) + h * LLAMA["vocab_size"]
    adapter = layers * r * (h + h + h + i + sum(out for _, out in linear))
    return (merged + adapter) / merged


def time_interleaved(
    runs: dict[str, Callable], batch: dict[str, np.ndarray], rounds: int
) -> dict[str, float]:
    """Median seconds per run of each engine, one run of each per round after two warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds + 2):
        for name, run in runs.items():
            started = time.perf_counter()
            run(batch)
            if round_ >= 2:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}; "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{THREADS} threads (ORT intra_op_num_threads, torch.set_num_threads), no spinning"
    )


def settle() -> None:
    """Libraries quiet, torch on the fixed thread count: the set-up every timing run here starts from."""
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(THREADS)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--r", type=int, nargs="+", default=[32, 64, 256])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--work", type=Path, help="keep the models and graphs here (default: a temporary directory)"
    )
    args = parser.parse_args()
    settle()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        base = build_base(work / "llama")
        rows = []
        for r in args.r:
            runs = engines(work, base, r)
            for batch_size, length in SHAPES:
                rng = np.random.default_rng(0)
                batch = {
                    "input_ids": rng.integers(0, LLAMA["vocab_size"], (batch_size, length), dtype=np.int64),
                    "attention_mask": np.ones((batch_size, length), dtype=np.int64),
                }
                medians = time_interleaved(runs, batch, args.rounds)
                rows.append((r, (batch_size, length), medians))
    print(f"\nMachine: {machine()}\n")
    names = list(rows[0][2])
    print(
        "| r | batch x seq | "
        + " | ".join(f"{n} (ms)" for n in names)
        + " | adapter / merged | FLOPs ratio |"
    )
    print("|---|---|" + "---|" * len(names) + "---|---|")
    for r, (batch_size, length), medians in rows:
        ratio = medians["ORT adapter"] / medians["ORT merged"]
        cells = " | ".join(f"{1e3 * medians[n]:.2f}" for n in names)
        print(f"| {r} | {batch_size}x{length} | {cells} | {ratio:.2f} | {flop_ratio(r, length):.2f} |")


if __name__ == "__main__":
    main()
