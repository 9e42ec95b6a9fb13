"""Export a VeRA adapter as a plain PEFT LoRA adapter: exactly at rank r, or optimally truncated to rank K.

A VeRA layer's change `delta_W = diag(lambda_b) B diag(lambda_d) A` (with `A = vera_A[:, :in]`,
`B = vera_B[:out]`) is a rank-r product, so it is a LoRA delta `lora_B @ lora_A` with scaling 1
(`lora_alpha = r`, `use_rslora` false). PEFT's LoRA stores `lora_A` as (r, in) and `lora_B` as (out, r) for
`nn.Linear` and GPT-2 `Conv1D` alike (it transposes the product for `fan_in_fan_out`).

Precision rule. All scales go to one factor: `lora_A = A` and `lora_B = diag(lambda_b) B diag(lambda_d)`, each
rank component then rescaled by a power of two so both factors have similar magnitudes (exact; it keeps float16
factors out of underflow). In float32, `lora_A` is then exact and `lora_B` is rounded once (from its float64
value), so every element of `lora_B @ lora_A` is within `2**-24 (1 + 2**-28) sum_k |lora_B[i, k] lora_A[k, j]|` of
the VeRA delta: half the bound of rounding both `lambda_b * B` and `lambda_d * A`, the split PEFT's
`get_delta_weight` uses. In bfloat16 / float16 `lora_A` is rounded too, unless the projections already are in that
dtype (regenerated for a 16-bit base, see `plan.resolve_projections`); float16 also rounds its smallest elements
to an absolute 2**-25.

With `rank=K < r`, each layer gets the best rank-K approximation of its delta in the Frobenius norm, computed from
the factors alone: QR of the two thin factors and an SVD of a small (at most r x r) matrix, in float64; the full
out x in delta is never formed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import PROJECTION_KEYS, WEIGHTS_NAME, VeraAdapter, load_adapter
from .config import CONFIG_NAME
from .errors import AdapterError
from .io.index import ShardedTensorIndex
from .io.locations import Kind, locate
from .io.outputs import staged_output
from .io.writer import save_tensors
from .names import model_names
from .options import LORA_DTYPES, ToLoraOptions
from .plan import LayerDelta, build_plan
from .progress import progress_bar
from .reports import JsonFields, duration

DTYPES = {name: getattr(torch, name) for name in LORA_DTYPES}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

# What vLLM accepts, as of vLLM 0.14 (`vllm.config.lora.MaxLoRARanks`, default `max_lora_rank` 16).
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Config fields that mean the same in a LoRA config and are copied as the VeRA adapter wrote them.
_SHARED_CONFIG_FIELDS = (
    "target_modules",
    "exclude_modules",
    "fan_in_fan_out",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
)
_LORA_BIAS = {"none": "none", "all": "all", "vera_only": "lora_only"}
_VERA_TENSOR_SUFFIXES = (".vera_lambda_b", ".vera_lambda_d")


@dataclass(frozen=True)
class LoraLayer:
    """How one layer was exported.

    Attributes:
        module: Module path in the base model.
        rank: Rank of the written factors.
        truncation_error: `||delta_W - best rank-K||_F / ||delta_W||_F` (0 for the exact export).
        rounding_error: Relative Frobenius error that rounding the factors to the output dtype adds.
    """

    module: str
    rank: int
    truncation_error: float
    rounding_error: float


@dataclass
class LoraReport(JsonFields):
    """What `to_lora` wrote."""

    output: Path
    rank: int
    dtype: str
    exact: bool
    layers: list[LoraLayer] = field(default_factory=list)
    total_truncation_error: float = 0.0
    carried: list[str] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    command = "to-lora"
    ok = True
    json_properties = ("max_rounding_error",)

    @property
    def max_rounding_error(self) -> float:
        return max((layer.rounding_error for layer in self.layers), default=0.0)

    def text(self, quiet: bool = False) -> str:
        """What `vera-export to-lora` prints."""
        lines = [
            f"wrote a rank-{self.rank} {self.dtype} LoRA adapter for {len(self.layers)} layers to {self.output} "
            f"({duration(self.seconds)})"
        ]
        if self.exact:
            lines.append(
                f"exact up to rounding the factors to {self.dtype}: relative error at most "
                f"{self.max_rounding_error:.1e} per layer"
            )
        else:
            lines += [
                f"  {layer.module}: relative error {layer.truncation_error:.4f}" for layer in self.layers
            ]
            lines.append(
                f"total relative error {self.total_truncation_error:.4f} (best rank-{self.rank} approximation of "
                f"each layer; rounding to {self.dtype} adds at most {self.max_rounding_error:.1e})"
            )
        if self.carried:
            lines.append(f"carried over {len(self.carried)} trained tensors (biases, modules_to_save)")
        return "\n".join(lines)


def to_lora(
    base: str | Path,
    adapter: str | Path | VeraAdapter,
    output: str | Path,
    options: ToLoraOptions = ToLoraOptions(),
) -> LoraReport:
    """Write a PEFT LoRA adapter directory that computes what the VeRA adapter computes on `base`.

    Trained biases and `modules_to_save` tensors are copied under the keys PEFT's LoRA checkpoints use (the same
    as VeRA's), and `bias="vera_only"` becomes `"lora_only"`. Warnings (also in the report) say where vLLM would
    refuse the result.

    Args:
        base: The base model directory; only its safetensors headers are read.
        adapter: PEFT VeRA adapter directory, or an adapter loaded with `load_adapter`.
        output: Directory to create; written in full or not at all.
        options: See `ToLoraOptions` (`rank` None is the exact export at the adapter's r).

    Raises:
        AdapterError, IncompatibleAdapterError, OutputError: Bad inputs; the message says which and why.
        ValueError: An unknown `options.dtype`.
    """
    started = time.perf_counter()
    out_dtype = lora_dtype(options.dtype)
    rank = options.rank
    base, output = locate(base, Kind.BASE), Path(output)
    vera = load_adapter(adapter, options.allow_pickle)
    tensors = model_names(base, ShardedTensorIndex.from_dir(base), [vera]).index.tensors
    plan = build_plan([vera], tensors, options.rounding)
    plan.check_base_copies(tensors)
    notes = list(plan.warnings)
    r = vera.config.r
    if rank is not None and rank >= r:
        if rank > r:
            notes.append(
                f"rank {rank} is above the adapter's r = {r}; the exact export at rank {r} is written"
            )
        rank = None
    report = LoraReport(output, rank or r, str(out_dtype).removeprefix("torch."), exact=rank is None)

    label = "exporting layers" if rank is None else f"truncating layers to rank {rank}"
    with progress_bar(len(plan.deltas), label, options.progress) as advance:
        tensors, report.layers, report.total_truncation_error = _export_layers(
            plan.deltas.values(), rank, out_dtype, advance
        )
    extra = _trained_tensors(vera)
    tensors.update(extra)
    report.carried = sorted(extra)
    config = lora_config(vera, report.rank)
    report.warnings = notes + server_warnings(report.rank, config)
    with staged_output(output, [base, vera.path], options.force, options.fsync) as staging:
        (staging / CONFIG_NAME).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        save_tensors(staging / WEIGHTS_NAME, tensors, {"format": "pt"}, options.fsync)
    report.seconds = time.perf_counter() - started
    return report


def lora_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The output dtype for a name ("float32", "bf16", ...) or a torch dtype; float32, bfloat16 or float16."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"LoRA dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@torch.no_grad()
def exact_lora_factors(
    lambda_b: torch.Tensor,
    lambda_d: torch.Tensor,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    in_features: int,
    out_features: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lora_A, lora_B)` in float64 whose product is the layer's `delta_W` in `[out, in]` layout.

    `lora_A = vera_A[:, :in]` exactly; `lora_B = diag(lambda_b) vera_B[:out] diag(lambda_d)`, whose exact value
    (72 significant bits) is rounded to float64 once: relative error at most 2**-53 per element.
    """
    lora_A = vera_A[:, :in_features].double()
    lora_B = lambda_b.double()[:, None] * vera_B[:out_features].double() * lambda_d.double()[None, :]
    return lora_A, lora_B


@torch.no_grad()
def truncated_lora_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-`rank` approximation of `lora_B @ lora_A`, without forming that product.

    With `lora_B = Q_B R_B` and `lora_A.T = Q_A R_A` (reduced QR), the product is `Q_B (R_B R_A.T) Q_A.T`, so the
    SVD `U S V.T` of the small matrix `R_B R_A.T` gives the product's singular values and vectors (Eckart-Young).
    Runs in the factors' dtype (float64 from `exact_lora_factors`).

    Returns:
        `(lora_A_k, lora_B_k, singular_values)`: (rank, in) and (out, rank) factors with the singular values on
        `lora_B_k` (zero-padded where the delta has fewer than `rank`), and all singular values of the product.
    """
    q_b, r_b = torch.linalg.qr(lora_B)
    q_a, r_a = torch.linalg.qr(lora_A.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(rank, s.numel())
    lora_B_k = lora_B.new_zeros(lora_B.shape[0], rank)
    lora_A_k = lora_A.new_zeros(rank, lora_A.shape[1])
    lora_B_k[:, :k] = (q_b @ u[:, :k]) * s[:k]
    lora_A_k[:k] = vh[:k] @ q_a.T
    return lora_A_k, lora_B_k, s


def balance(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each rank component by a power of two (exact) so its column of `lora_B` and row of `lora_A` have
    about the same largest magnitude; the product is unchanged."""
    _, exp_a = torch.frexp(lora_A.abs().amax(dim=1))
    _, exp_b = torch.frexp(lora_B.abs().amax(dim=0))
    shift = torch.where((exp_a == 0) | (exp_b == 0), 0, torch.div(exp_b - exp_a, 2, rounding_mode="floor"))
    scaled_A = torch.ldexp(lora_A, shift[:, None].to(lora_A.dtype))
    return scaled_A, torch.ldexp(lora_B, -shift[None, :].to(lora_B.dtype))


def product_error(
    lora_A: torch.Tensor, lora_B: torch.Tensor, exact_A: torch.Tensor, exact_B: torch.Tensor
) -> float:
    """`||lora_B lora_A - exact_B exact_A||_F` in float64, from the factors: the difference is the thin product
    `[lora_B - exact_B, exact_B] @ [lora_A; lora_A - exact_A]`, whose norm needs no cancellation of large terms."""
    lora_A, lora_B = lora_A.double(), lora_B.double()
    return product_norm(torch.cat([lora_A, lora_A - exact_A]), torch.cat([lora_B - exact_B, exact_B], dim=1))


def product_norm(lora_A: torch.Tensor, lora_B: torch.Tensor) -> float:
    """`||lora_B @ lora_A||_F` from the Gram matrices of the factors: `sqrt(sum((B.T B) * (A A.T)))`."""
    squared = ((lora_B.T @ lora_B) * (lora_A @ lora_A.T)).sum().item()
    return max(squared, 0.0) ** 0.5


def _export_layers(
    layers: Iterable[list[LayerDelta]], rank: int | None, dtype: torch.dtype, advance: Callable[[int], None]
) -> tuple[dict[str, torch.Tensor], list[LoraLayer], float]:
    """Every layer's `lora_A` / `lora_B` by checkpoint key, their report lines and the total truncation error.

    Calls `advance(1)` after each layer.
    """
    tensors: dict[str, torch.Tensor] = {}
    reports: list[LoraLayer] = []
    kept, dropped = 0.0, 0.0
    for deltas in layers:
        delta = deltas[0]  # a plan of one adapter holds one delta per layer
        lora_A, lora_B, layer, energy = _export_layer(delta, rank, dtype)
        key = f"base_model.model.{delta.target.module}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = lora_A, lora_B
        reports.append(layer)
        kept, dropped = kept + energy, dropped + energy * layer.truncation_error**2
        advance(1)
    return tensors, reports, (dropped / kept) ** 0.5 if kept > 0 else 0.0


def _export_layer(
    delta: LayerDelta, rank: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, LoraLayer, float]:
    """One layer's rounded factors, its report line and its squared delta norm (to weigh the total error)."""
    t, projections = delta.target, delta.projections
    target_A, target_B = exact_lora_factors(
        delta.lambda_b, delta.lambda_d, projections.vera_A, projections.vera_B, t.in_features, t.out_features
    )
    if rank is None:
        energy = product_norm(target_A, target_B) ** 2
        truncation = 0.0
    else:
        target_A, target_B, singular = truncated_lora_factors(target_A, target_B, rank)
        energy = float((singular**2).sum())
        truncation = (float((singular[rank:] ** 2).sum()) / energy) ** 0.5 if energy > 0 else 0.0
    target_A, target_B = balance(target_A, target_B)
    lora_A, lora_B = target_A.to(dtype), target_B.to(dtype)
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise AdapterError(
            f"{delta.adapter}: the LoRA factors of {t.module} overflow {dtype} (its lambdas are too large for it); "
            f"export with dtype float32 or bfloat16"
        )
    rounding = product_error(lora_A, lora_B, target_A, target_B) / energy**0.5 if energy > 0 else 0.0
    return lora_A, lora_B, LoraLayer(t.module, lora_A.shape[0], truncation, rounding), energy


def lora_config(vera: VeraAdapter, rank: int) -> dict:
    """The LoRA `adapter_config.json` for a VeRA adapter exported at `rank`: scaling 1, same targets."""
    config = {name: vera.raw_config[name] for name in _SHARED_CONFIG_FIELDS if name in vera.raw_config}
    if isinstance(config.get("target_modules"), str):
        # A regex alone decides (PEFT ignores these with one); PEFT's LoraConfig refuses them next to a regex.
        config.pop("layers_to_transform", None)
        config.pop("layers_pattern", None)
    config.update(
        peft_type="LORA",
        r=rank,
        lora_alpha=rank,  # scaling = lora_alpha / r = 1, with use_rslora false
        use_rslora=False,
        use_dora=False,
        lora_dropout=0.0,
        init_lora_weights=True,
        rank_pattern={},
        alpha_pattern={},
        bias=_LORA_BIAS[vera.config.bias],
    )
    return config


def server_warnings(rank: int, config: dict) -> list[str]:
    """Where vLLM (as of 0.14) would refuse this LoRA adapter, and what to do."""
    lines = []
    if rank > max(VLLM_MAX_LORA_RANKS):
        lines.append(
            f"rank {rank} is above the largest max_lora_rank vLLM accepts ({max(VLLM_MAX_LORA_RANKS)}); export "
            f"with --rank {max(VLLM_MAX_LORA_RANKS)} or lower for vLLM"
        )
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        needed = min(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
        lines.append(
            f"rank {rank} is above vLLM's default max_lora_rank ({VLLM_DEFAULT_MAX_LORA_RANK}); serve with "
            f"--max-lora-rank {needed} or export with --rank {VLLM_DEFAULT_MAX_LORA_RANK}"
        )
    if config.get("modules_to_save"):
        modules = list(dict.fromkeys(config["modules_to_save"]))
        lines.append(
            f"modules_to_save {modules} is set: vLLM refuses such adapters; serve a merged checkpoint "
            f"(vera-export merge) instead"
        )
    if config["bias"] != "none":
        lines.append(
            f"bias is {config['bias']!r}: vLLM ignores or refuses trained biases (older releases need "
            f"--enable-lora-bias); serve a merged checkpoint (vera-export merge) instead"
        )
    return lines


def _trained_tensors(vera: VeraAdapter) -> dict[str, torch.Tensor]:
    """Trained biases and `modules_to_save` tensors as the adapter file stores them: PEFT's LoRA checkpoints use
    the same keys (`<module>.base_layer.bias` for an adapted layer, `<name>` otherwise)."""
    if not vera.replacements:
        return {}
    return {
        key: tensor
        for key, tensor in vera.tensors.items()
        if key not in PROJECTION_KEYS.values() and not key.endswith(_VERA_TENSOR_SUFFIXES)
    }
