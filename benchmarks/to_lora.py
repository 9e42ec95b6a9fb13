"""`vera_export.to_lora` against PEFT's `convert_to_lora`: time and accuracy at the same rank.

    python benchmarks/to_lora.py WORKDIR [--layers 2] [--rank 16] [--check-layer 0]

Uses (and builds if missing) the TinyLlama-1.1B-shaped bf16 model of `make_checkpoint.py` with its all-linear VeRA
adapter (r=256) and prints markdown tables: the wall time of each export, and, for every adapted module of one
decoder layer, errors relative to `||delta_W||_F`, all in float64 against the exact delta: at rank K, the optimum
(Eckart-Young) and how far each export lies from the optimal rank-K matrix; at rank r, each export's distance from
the delta itself.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch
import transformers
from make_checkpoint import ensure
from peft import PeftModel
from peft.tuners.lora.conversion import convert_to_lora
from safetensors.torch import load_file

from vera_export import ToLoraOptions, load_adapter
from vera_export.io.index import ShardedTensorIndex
from vera_export.lora import to_lora
from vera_export.plan import build_plan


def timed(function, *args, repeat: int = 1, **kwargs):
    """The result and the fastest of `repeat` wall times (the machine's load varies; the minimum is the cost)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        best = min(best, time.perf_counter() - started)
    return result, best


def exact_deltas(base: Path, adapter: Path, layer: int) -> dict[str, torch.Tensor]:
    plan = build_plan([load_adapter(adapter)], ShardedTensorIndex.from_dir(base).tensors)
    deltas = {}
    for (delta,) in plan.deltas.values():
        if f".layers.{layer}." in delta.target.module:
            left, right = delta.factors()
            deltas[delta.target.module] = left @ right
    return deltas


def peft_exports(base: Path, adapter: Path, ranks: list[int]) -> tuple[dict, float, dict]:
    """PEFT's way: load the bf16 model with the VeRA adapter, then `convert_to_lora` at each rank. PEFT keeps the
    VeRA tensors in float32 on a bf16 model, so its deltas, SVDs and factors are float32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter)
        load_seconds = time.perf_counter() - started
        exports, seconds = {}, {}
        for rank in ranks:
            (_, exports[rank]), seconds[rank] = timed(convert_to_lora, model, rank, repeat=2)
    return exports, load_seconds, seconds


def product(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    key = f"base_model.model.{module}"
    return tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--rank", type=int, default=16, help="the truncated rank to compare (the exact one is r)"
    )
    parser.add_argument("--check-layer", type=int, default=0)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    base, adapter = ensure(args.workdir, args.layers)
    r = load_adapter(adapter).config.r
    ranks = [args.rank, r]

    ours: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    print(
        f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )
    print("| export | rank | factors | seconds (best of 3 / 2) |\n| --- | --- | --- | --- |")
    for rank in ranks:
        for dtype in ("float32", "bfloat16"):
            out = args.workdir / f"lora-{rank}-{dtype}"
            options = ToLoraOptions(rank=rank, dtype=dtype, force=True, progress=False)
            _, seconds = timed(to_lora, base, adapter, out, options, repeat=3)
            ours[rank, dtype] = load_file(out / "adapter_model.safetensors")
            print(f"| vera-export to-lora | {rank} | {dtype} | {seconds:.2f} |")
    theirs, load_seconds, seconds = peft_exports(base, adapter, ranks)
    print(f"| PEFT: load bf16 base + VeRA adapter | | | {load_seconds:.2f} |")
    for rank in ranks:
        print(f"| PEFT convert_to_lora | {rank} | float32 | {seconds[rank]:.2f} |")

    print(
        f"\n| module | rank {args.rank}: optimum | ours fp32, above optimum | PEFT, above optimum "
        f"| rank {r}: ours fp32 | ours bf16 | PEFT |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    for module, delta in exact_deltas(base, adapter, args.check_layer).items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = args.rank
        best, norm = (u[:, :k] * s[:k]) @ vh[:k], s.norm()
        optimum = (s[k:].norm() / norm).item()
        excess = [((product(t, module) - best).norm() / norm).item() for t in (ours[k, "float32"], theirs[k])]
        exact = [
            ((product(t, module) - delta).norm() / norm).item()
            for t in (ours[r, "float32"], ours[r, "bfloat16"], theirs[r])
        ]
        cells = [f"{optimum:.4f}", *(f"{e:.2e}" for e in excess), *(f"{e:.2e}" for e in exact)]
        print(f"| {module.split('layers.')[-1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
