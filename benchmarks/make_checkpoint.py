"""Build the benchmark's checkpoints once, deterministically: TinyLlama-1.1B-shaped random bf16 models and an
all-linear VeRA adapter (r=256, stored projections, random non-zero lambdas).

    python benchmarks/make_checkpoint.py WORKDIR [--layers 22 8]

writes WORKDIR/llama-<L>L (1 GB shards, with an index) and WORKDIR/llama-<L>L-vera for each layer count. The
tensors are written straight to safetensors with vera_export's streaming writer, in the names and shapes
transformers gives `LlamaForCausalLM`, so building needs little memory and no model init.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from vera_export.io.index import INDEX_NAME
from vera_export.io.writer import SafetensorsWriter, save_tensors, write_index
from vera_export.projections import generate_projections

SHARD_BYTES = 1_000_000_000
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 256


def llama_config(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def tensor_shapes(config: transformers.LlamaConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)  # norm weights
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def build_base(out: Path, layers: int) -> dict[str, tuple[int, ...]]:
    config = llama_config(layers)
    shapes = tensor_shapes(config)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out.mkdir(parents=True)
    seeds = {name: i for i, name in enumerate(shapes)}
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        entries = [(n, torch.bfloat16, shapes[n]) for n in names]
        with SafetensorsWriter(out / file, entries, {"format": "pt"}) as writer:
            for n in names:
                writer.write(n, _value(n, shapes[n], seeds[n]))
                weight_map[n] = file
    total = sum(math.prod(s) * 2 for s in shapes.values())
    write_index(out / INDEX_NAME, weight_map, {"total_size": total})
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    return shapes


@dataclass(frozen=True)
class Strength:
    """How strong an adapter is: lambda_b ~ N(0, b), lambda_d ~ d_mean + N(0, d); with `like_weights`, lambda_b is
    rescaled per layer so that the delta's Frobenius norm equals the weight's (the weights are N(0, 0.02))."""

    b: float
    d: float
    d_mean: float = 0.0
    like_weights: bool = False

    def describe(self) -> str:
        d = f"{self.d_mean:g} + N(0, {self.d:g})" if self.d_mean else f"N(0, {self.d:g})"
        scale = ", lambda_b scaled so that the delta's norm is the weight's" if self.like_weights else ""
        return f"lambda_b ~ N(0, {self.b:g}), lambda_d ~ {d}{scale}"

    def lambdas(
        self, vera_A: torch.Tensor, vera_B: torch.Tensor, in_features: int, out_features: int, generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(lambda_b, lambda_d)` for one layer of this strength, drawn from `generator`."""
        rank = vera_A.shape[0]
        lambda_b = torch.randn(out_features, generator=generator) * self.b
        lambda_d = self.d_mean + torch.randn(rank, generator=generator) * self.d
        if self.like_weights:
            delta = (lambda_b[:, None] * vera_B[:out_features]) @ (
                lambda_d[:, None] * vera_A[:, :in_features]
            )
            lambda_b *= 0.02 * math.sqrt(out_features * in_features) / delta.norm().item()
        return lambda_b, lambda_d


# The adapter the merge benchmark has always used: the delta about 3e-4 of the weights.
DEFAULT_STRENGTH = Strength(b=0.01, d=0.05, d_mean=0.1)
STRENGTHS = {
    "weak": Strength(b=0.01, d=0.1),
    "medium": Strength(b=0.1, d=0.1),
    "strong": Strength(b=0.5, d=0.5),
    "delta = W": Strength(b=1.0, d=0.5, like_weights=True),
}


def build_adapter(
    out: Path,
    shapes: dict[str, tuple[int, ...]],
    seed: int = 1,
    rank: int = RANK,
    strength: Strength = DEFAULT_STRENGTH,
) -> None:
    """An all-linear VeRA adapter as PEFT saves it for a bf16 model (projections rounded to bf16, stored fp32)."""
    modules = [
        n.removesuffix(".weight") for n in shapes if n.endswith(".weight") and n.split(".")[-2] in TARGETS
    ]
    max_in = max(shapes[f"{m}.weight"][1] for m in modules)
    max_out = max(shapes[f"{m}.weight"][0] for m in modules)
    vera_A, vera_B = generate_projections(0, rank, max_in, max_out)
    vera_A, vera_B = vera_A.bfloat16().float(), vera_B.bfloat16().float()
    tensors = {"base_model.vera_A": vera_A, "base_model.vera_B": vera_B}
    generator = torch.Generator().manual_seed(seed)
    for module in modules:
        out_features, in_features = shapes[f"{module}.weight"]
        lambda_b, lambda_d = strength.lambdas(vera_A, vera_B, in_features, out_features, generator)
        tensors[f"base_model.model.{module}.vera_lambda_b"] = lambda_b
        tensors[f"base_model.model.{module}.vera_lambda_d"] = lambda_d
    out.mkdir(parents=True)
    save_tensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {
        "peft_type": "VERA",
        "r": rank,
        "target_modules": TARGETS,
        "projection_prng_key": 0,
        "save_projection": True,
        "vera_dropout": 0.0,
        "d_initial": 0.1,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def ensure(
    workdir: Path, layers: int, strength: Strength = DEFAULT_STRENGTH, name: str = ""
) -> tuple[Path, Path]:
    """The base and an adapter of `strength` (named `name`, the default adapter when empty), built if missing."""
    base = workdir / f"llama-{layers}L"
    adapter = workdir / (
        f"llama-{layers}L-vera-{name.replace(' ', '').replace('=', '-')}" if name else f"llama-{layers}L-vera"
    )
    if not (base / INDEX_NAME).is_file():
        shutil.rmtree(base, ignore_errors=True)
        build_base(base, layers)
    if not (adapter / "adapter_config.json").is_file():
        shutil.rmtree(adapter, ignore_errors=True)
        build_adapter(adapter, tensor_shapes(llama_config(layers)), strength=strength)
    return base, adapter


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--layers", type=int, nargs="+", default=[22, 8])
    args = parser.parse_args()
    for layers in args.layers:
        base, adapter = ensure(args.workdir, layers)
        print(f"{base} and {adapter} ready")


if __name__ == "__main__":
    main()
