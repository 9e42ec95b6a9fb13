"""The whole-model check of `verify`: the merged model's outputs against the base model with VeRA layers, on
fixed inputs, when two copies of the model fit in memory."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .adapter import VeraAdapter, VeraLayer
from .checks import Check
from .errors import CheckpointError
from .io.index import ShardedTensorIndex
from .options import Rounding
from .precision import compute_dtype, unit_roundoff

# Relative tolerance of model outputs, in units of the weights' unit roundoff: rounding every weight once moves
# each logit by a few roundoffs of its scale.
MODEL_ROUNDOFFS = 16.0
INPUT_SHAPES = ((2, 7), (1, 16))


def fits_in_memory(index: ShardedTensorIndex) -> bool:
    """Whether two copies of the model, in float64 at worst, fit in half the memory available."""
    params = sum(math.prod(info.shape) for info in index.tensors.values())
    needed = 2 * params * 8  # two models, float64 at worst
    available = available_memory()
    return available is not None and needed < 0.5 * available


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes the system can give without swapping: MemAvailable, which counts the page cache it can drop (the
    checkpoint just read is in it), else the free pages; None when neither is known."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def model_inputs(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    """Fixed inputs of two shapes; the second row of a batch is left-padded, to exercise the attention mask."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for batch, length in INPUT_SHAPES:
        input_ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        if batch > 1:
            attention_mask[1, : length // 3] = 0
        inputs.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return inputs


@torch.no_grad()
def check_model_outputs(
    base: Path, adapters: Sequence[VeraAdapter], merged: Path, rounding: Rounding = Rounding.FMA
) -> list[Check]:
    """Compare the merged model's outputs with the base model plus `VeraLinear` layers on `model_inputs`.

    Pass adapters with their projections pinned (`plan.pin_projections`): the reference model is loaded in the
    compute dtype, and must use the projections resolved on the checkpoint's own dtype.
    """
    from .layers import apply_vera
    from .modeling import load_model, model_outputs

    dtype = storage_dtype(base)
    compute = compute_dtype(dtype)
    unmerged = apply_vera(load_model(base, compute), [cast_adapter(a, compute) for a in adapters], rounding)
    inputs = model_inputs(unmerged.config.vocab_size)
    expected = [model_outputs(unmerged, batch) for batch in inputs]
    del unmerged
    merged_model = load_model(merged, compute)
    checks = []
    roundoff = unit_roundoff(dtype)
    for batch, reference in zip(inputs, expected):
        actual = model_outputs(merged_model, batch)
        for key, want in reference.items():
            got = actual[key]
            # Outputs the reference cannot compute (NaN or Inf, from a base holding them) are compared position
            # by position: the merged model must not compute them either, and the rest is compared in numbers.
            finite = torch.isfinite(want)
            same = bool(((got == want) | (got.isnan() & want.isnan()))[~finite].all())
            error = (got - want).abs()[finite].max().item() if finite.any() else 0.0
            scale = want.abs()[finite].max().item() if finite.any() else 1.0
            tolerance = MODEL_ROUNDOFFS * roundoff * (scale or 1.0)
            detail = (
                ""
                if finite.all()
                else f"{int((~finite).sum())} outputs not finite, {'the same' if same else 'NOT the same'} in the merged model"
            )
            shape = "x".join(map(str, batch["input_ids"].shape))
            checks.append(
                Check(
                    f"model {key} [{shape}]",
                    error,
                    error / (scale or 1.0),
                    tolerance,
                    same and error <= tolerance,
                    detail,
                )
            )
    return checks


def storage_dtype(model_dir: Path) -> torch.dtype:
    """The floating point dtype most of a checkpoint's tensors are stored in."""
    index = ShardedTensorIndex.from_dir(model_dir)
    floats = [info.dtype for info in index.tensors.values() if info.dtype.is_floating_point]
    if not floats:
        raise CheckpointError(f"{model_dir}: holds no floating point weights")
    return max(set(floats), key=floats.count)


def cast_adapter(adapter: VeraAdapter, dtype: torch.dtype) -> VeraAdapter:
    """A copy of the adapter with lambdas and stored projections in `dtype` (for a reference in that precision)."""
    layers = {m: VeraLayer(m, v.lambda_b.to(dtype), v.lambda_d.to(dtype)) for m, v in adapter.layers.items()}

    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(dtype)

    return dataclasses.replace(
        adapter, layers=layers, vera_A=cast(adapter.vera_A), vera_B=cast(adapter.vera_B)
    )
