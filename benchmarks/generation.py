"""Generation speed and sizes: ONNX Runtime GenAI packages against transformers `generate`, side by side.

    python benchmarks/generation.py [--layers 4] [--rounds 3] [--work DIR] [--results benchmarks/generation.md]
    python benchmarks/generation.py --layers 22 --sizes-only    # appends the full-depth package sizes

Builds (once) a TinyLlama-width random bf16 Llama of `--layers` layers (hidden 2048, intermediate 5632, 32 heads,
4 KV heads, vocabulary 32000) with a tokenizer, and all-linear VeRA adapters at r = 64 and r = 256. Exports
text-generation packages (fp32, fp16, int4; merged and adapter mode, r = 64; adapter mode at r = 256 too) and
today's no-cache graph (`--task causal-lm`, merged, fp32). Then, on 2 threads, for prompts of 16 and 256 tokens
and 64 new tokens (greedy, the end-of-sequence token held back): the prefill time (the prompt's forward pass) and
the decode rate of every package in ONNX Runtime GenAI, of transformers `generate` with PEFT's unmerged model
and with the merged model (float32), and of the no-cache graph in ONNX Runtime (16 new tokens: it recomputes the
whole sequence per token). Each round runs every engine once, in turn; the tables give medians. Also the package
sizes, the size of an adapter file against the same adapter exported with `to-lora`, and the rate the machine
streams a matrix through a matrix-vector product, which bounds decoding: every new token reads every weight once.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # idle threads of one engine must not spin while another runs

import json
import platform
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from make_checkpoint import build_adapter, build_base  # noqa: E402

from fixtures.build import build_tokenizer  # noqa: E402
from vera_export import OnnxOptions, ToLoraOptions, export_onnx, merge_into, onnx_adapter, to_lora  # noqa: E402

THREADS = 2
PROMPTS = (16, 256)
NEW_TOKENS = 64
NO_CACHE_TOKENS = 16
PACKAGES = [  # (rank, mode, precision)
    (64, "merged", "fp32"),
    (64, "adapter", "fp32"),
    (64, "merged", "fp16"),
    (64, "adapter", "fp16"),
    (64, "merged", "int4"),
    (64, "adapter", "int4"),
    (256, "adapter", "fp32"),
    (256, "merged", "fp32"),
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text()
    features = [f for f in ("avx2", "avx512f", "amx_tile") if f" {f}" in flags]
    return f"{cpu} ({', '.join(features)}), {os.cpu_count()} CPUs"


def ensure_inputs(work: Path, layers: int) -> tuple[Path, dict[int, Path]]:
    base = work / f"llama-{layers}L"
    if not (base / "tokenizer.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        shapes = build_base(base, layers)
        build_tokenizer(base, 32000)
        (base / ".shapes.json").write_text(json.dumps({k: list(v) for k, v in shapes.items()}))
    shapes = {k: tuple(v) for k, v in json.loads((base / ".shapes.json").read_text()).items()}
    adapters = {}
    for rank in (64, 256):
        adapter = work / f"llama-{layers}L-vera-r{rank}"
        if not (adapter / "adapter_config.json").is_file():
            shutil.rmtree(adapter, ignore_errors=True)
            build_adapter(adapter, shapes, seed=rank, rank=rank)
        adapters[rank] = adapter
    return base, adapters


def export_all(work: Path, base: Path, adapters: dict[int, Path]) -> tuple[dict, Path]:
    packages = {}
    for rank, mode, precision in PACKAGES:
        out = work / f"genai-r{rank}-{mode}-{precision}"
        if not (out / "vera_export.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            options = OnnxOptions(
                task="text-generation", mode=mode, precision=precision, verify=False, progress=False
            )
            export_onnx(base, [adapters[rank]], out, options)
            print(f"exported {out.name} in {time.perf_counter() - started:.1f} s", flush=True)
        config = json.loads((out / "genai_config.json").read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = THREADS
        (out / "genai_config.json").write_text(json.dumps(config, indent=2))
        packages[rank, mode, precision] = out
    no_cache = work / "onnx-r64-merged-causal-lm"
    if not (no_cache / "vera_export.json").is_file():
        shutil.rmtree(no_cache, ignore_errors=True)
        export_onnx(base, [adapters[64]], no_cache, OnnxOptions(verify=False, progress=False))
    return packages, no_cache


def prompt_tokens(length: int) -> list[int]:
    generator = torch.Generator().manual_seed(length)
    return [1, *torch.randint(4, 32000, (length - 1,), generator=generator).tolist()]


def genai_engine(directory: Path) -> Callable[[list[int]], tuple[float, float]]:
    import onnxruntime_genai as og

    model = og.Model(str(directory))

    def run(prompt: list[int]) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        length = len(prompt) + NEW_TOKENS
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(np.array(prompt, dtype=np.int32))
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        return prefill, NEW_TOKENS / (time.perf_counter() - started)

    return run


def torch_engine(model: torch.nn.Module) -> Callable[[list[int]], tuple[float, float]]:
    eos = model.config.eos_token_id

    @torch.no_grad()
    def run(prompt: list[int]) -> tuple[float, float]:
        ids = torch.tensor([prompt])
        kwargs = dict(do_sample=False, pad_token_id=eos, suppress_tokens=[eos])
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)
        total = time.perf_counter() - started
        return prefill, (NEW_TOKENS - 1) / max(total - prefill, 1e-9)

    return run


def no_cache_engine(directory: Path) -> Callable[[list[int]], tuple[float, float]]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = THREADS
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])

    def forward(tokens: list[int]) -> np.ndarray:
        ids = np.array([tokens], dtype=np.int64)
        return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0, -1]

    def run(prompt: list[int]) -> tuple[float, float]:
        started = time.perf_counter()
        logits = forward(prompt)
        prefill = time.perf_counter() - started
        tokens = [*prompt, int(logits.argmax())]
        started = time.perf_counter()
        for _ in range(NO_CACHE_TOKENS - 1):
            tokens.append(int(forward(tokens).argmax()))
        return prefill, (NO_CACHE_TOKENS - 1) / (time.perf_counter() - started)

    return run


def transformers_models(base: Path, adapter: Path) -> dict[str, torch.nn.Module]:
    import transformers
    from peft import PeftModel

    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
        ).eval()
        merged = merge_into(
            transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), [adapter]
        )
    return {
        "transformers generate, PEFT unmerged (fp32)": peft,
        "transformers generate, merged (fp32)": merged.eval(),
    }


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def matvec_rate() -> float:
    """Bytes of matrix per second the machine streams through a float32 matrix-vector product on `THREADS`
    threads, best of five over a 1 GiB matrix: one decode step is such products over every weight."""
    matrix = torch.ones(2**14, 2**14, dtype=torch.float32)
    vector = torch.ones(2**14, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        torch.mv(matrix, vector)
        best = min(best, time.perf_counter() - started)
    return matrix.numel() * matrix.element_size() / best


def sizes_only(args: argparse.Namespace) -> None:
    """Export the merged fp32 and int4 packages of a `--layers`-layer model and append their sizes."""
    base, adapters = ensure_inputs(args.work, args.layers)
    found = {}
    for precision in ("fp32", "int4"):
        out = args.work / f"genai-{args.layers}L-r64-merged-{precision}"
        if not (out / "vera_export.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            options = OnnxOptions(task="text-generation", precision=precision, verify=False, progress=False)
            export_onnx(base, [adapters[64]], out, options)
        found[precision] = size(out)
    lines = [
        "",
        f"At full depth ({args.layers} layers, `--layers {args.layers} --sizes-only`): the merged r=64 package is "
        f"{found['fp32'] / 1e6:.0f} MB in fp32 and {found['int4'] / 1e6:.0f} MB in int4, "
        f"{found['int4'] / found['fp32']:.2f} of it.",
    ]
    with args.results.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vera-export-generation"))
    parser.add_argument("--results", type=Path, default=HERE / "generation.md")
    parser.add_argument(
        "--sizes-only", action="store_true", help="only export and size the fp32 and int4 packages"
    )
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.sizes_only:
        sizes_only(args)
        return
    base, adapters = ensure_inputs(args.work, args.layers)
    packages, no_cache = export_all(args.work, base, adapters)
    load = os.getloadavg()[0]

    engines: dict[str, Callable] = {}
    for (rank, mode, precision), directory in packages.items():
        engines[f"GenAI package, {precision}, {mode}, r={rank}"] = genai_engine(directory)
    engines["no-cache graph (ONNX Runtime, fp32, merged)"] = no_cache_engine(no_cache)
    for name, model in transformers_models(base, adapters[64]).items():
        engines[f"{name}, r=64"] = torch_engine(model)
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for round_number in range(args.rounds + 1):  # round 0 warms up
        for name, engine in engines.items():
            for length in PROMPTS:
                measured = engine(prompt_tokens(length))
                if round_number:
                    results.setdefault((name, length), []).append(measured)
        print(f"round {round_number} done", flush=True)

    def median(name: str, length: int, k: int) -> float:
        return statistics.median(m[k] for m in results[name, length])

    lines = [
        "# Generation: ONNX Runtime GenAI packages against transformers",
        "",
        f"Machine: {machine()}; onnxruntime {ort.__version__}, torch {torch.__version__}, {THREADS} threads; load "
        f"average {load:.2f} when the measurements began.",
        "",
        f"Model: a random TinyLlama-width Llama of {args.layers} layers (hidden 2048, intermediate 5632, 32 heads, 4 "
        "KV heads, vocabulary 32000, bf16 checkpoint); all-linear VeRA adapters (stored projections, "
        "lambda_b ~ N(0, 0.01), lambda_d ~ 0.1 + N(0, 0.05)). Greedy decoding of 64 new tokens "
        f"({NO_CACHE_TOKENS} for the no-cache graph); medians of {args.rounds} rounds, engines interleaved, after a "
        "warm-up round. Produced by `python benchmarks/generation.py`.",
        "",
        "| engine | prefill 16 (ms) | decode, prompt 16 (tokens/s) | prefill 256 (ms) | decode, prompt 256 (tokens/s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in engines:
        cells = [f"{median(name, n, 0) * 1e3:.0f} | {median(name, n, 1):.1f}" for n in PROMPTS]
        lines.append(f"| {name} | {' | '.join(cells)} |")

    merged_torch = "transformers generate, merged (fp32), r=64"
    ratios = []
    for n in PROMPTS:
        fp32 = median("GenAI package, fp32, merged, r=64", n, 1) / median(merged_torch, n, 1)
        ratios.append(f"| decode, GenAI fp32 merged / transformers merged, prompt {n} | {fp32:.2f} | >= 2 |")
        for rank in (64, 256):
            adapter = median(f"GenAI package, fp32, adapter, r={rank}", n, 1)
            merged = median(f"GenAI package, fp32, merged, r={rank}", n, 1)
            target = "<= 1.15" if rank <= 64 else "stated"
            ratios.append(
                f"| decode time, adapter / merged mode, fp32, r={rank}, prompt {n} | {merged / adapter:.2f} | {target} |"
            )
    sizes = {key: size(directory) for key, directory in packages.items()}
    rate = matvec_rate()
    # Per token, every weight is read but the embedding table, of which only the new token's row is.
    weights = (packages[64, "merged", "fp32"] / "model.onnx.data").stat().st_size - 32000 * 2048 * 4
    lines += ["", "| ratio | value | aim |", "| --- | ---: | --- |", *ratios]
    lines.append(
        f"| package size, int4 / fp32 (merged, r=64) | {sizes[64, 'merged', 'int4'] / sizes[64, 'merged', 'fp32']:.2f} | <= 0.3 |"
    )

    package_rate = median("GenAI package, fp32, merged, r=64", 16, 1)
    torch_rate = median(merged_torch, 16, 1)
    lines += [
        "",
        f"Decoding reads every weight but the embedding table once per token, {weights / 1e9:.2f} GB in fp32. A "
        f"{THREADS}-thread float32 matrix-vector product over 1 GiB streams {rate / 1e9:.1f} GB/s on this machine, "
        f"so these weights allow at most {rate / weights:.1f} tokens/s: the fp32 package decodes at "
        f"{package_rate:.1f} ({package_rate * weights / rate:.2f} of that floor), transformers' merged model at "
        f"{torch_rate:.1f} ({torch_rate * weights / rate:.2f}). Twice transformers' rate is "
        f"{2 * torch_rate * weights / rate:.2f} of the floor: fp32 decoding is bound by memory bandwidth, and int4, "
        "about a quarter of the bytes, is what decodes several times faster.",
    ]
    lines += ["", "| package | size (MB) |", "| --- | ---: |"]
    lines += [f"| {p}, {m}, r={r} | {s / 1e6:.0f} |" for (r, m, p), s in sizes.items()]
    lines += ["", "| adapter as | r = 64 (MB) | r = 256 (MB) |", "| --- | ---: | ---: |"]
    files = {}
    for rank in (64, 256):
        file = args.work / f"other-r{rank}.onnx_adapter"
        file.unlink(missing_ok=True)
        files["ONNX Runtime adapter file (fp32 lambdas)", rank] = onnx_adapter(
            packages[rank, "adapter", "fp32"], adapters[rank], file
        ).bytes_written
        lora = args.work / f"lora-r{rank}"
        shutil.rmtree(lora, ignore_errors=True)
        to_lora(base, adapters[rank], lora, ToLoraOptions(dtype="bfloat16", progress=False))
        files["to-lora LoRA adapter (bf16, exact)", rank] = size(lora)
        files["PEFT VeRA checkpoint (stored projections)", rank] = size(adapters[rank])
    for label in dict.fromkeys(label for label, _ in files):
        lines.append(f"| {label} | {files[label, 64] / 1e6:.2f} | {files[label, 256] / 1e6:.2f} |")
    text = "\n".join(lines) + "\n"
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
