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
from .checks import Check, Comparison
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


class ModelCheckSkipped(Exception):
    """The reference outputs cannot be computed for this model; the reason says why."""


def architecture_inputs(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """Fixed inputs of the kind the architecture reads (its `main_input_name`): token ids (`model_inputs`), with
    decoder tokens for an encoder-decoder; log-mel features (Whisper) or pixels (ViT) of the config's sizes.

    Raises:
        ModelCheckSkipped: An input kind this check does not make.
    """
    config = model.config
    main = getattr(model, "main_input_name", "input_ids")
    generator = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype  # features and pixels in the model's own precision
    if main == "input_ids":
        inputs = model_inputs(config.vocab_size)
    else:
        if main == "pixel_values" and hasattr(config, "image_size") and hasattr(config, "num_channels"):
            shape = (config.num_channels, config.image_size, config.image_size)
        elif (
            main == "input_features"
            and hasattr(config, "num_mel_bins")
            and hasattr(config, "max_source_positions")
        ):
            shape = (
                config.num_mel_bins,
                2 * config.max_source_positions,
            )  # the encoder's convolutions halve it
        else:
            raise ModelCheckSkipped(
                f"{type(model).__name__} reads {main}, for which this check makes no inputs"
            )
        inputs = [
            {main: torch.randn(batch, *shape, generator=generator).to(dtype)} for batch, _ in INPUT_SHAPES
        ]
    if getattr(config, "is_encoder_decoder", False):
        vocab = config.vocab_size
        for batch, (rows, length) in zip(inputs, INPUT_SHAPES):
            batch["decoder_input_ids"] = torch.randint(0, vocab, (rows, length), generator=generator)
    return inputs


@torch.no_grad()
def check_model_outputs(
    base: Path, adapters: Sequence[VeraAdapter], merged: Path, rounding: Rounding = Rounding.FMA
) -> list[Check]:
    """Compare the merged model's outputs with the base model plus `VeraLinear` layers on `architecture_inputs`.

    Pass adapters with their projections pinned (`plan.pin_projections`): the reference model is loaded in the
    compute dtype, and must use the projections resolved on the checkpoint's own dtype.

    Raises:
        ModelCheckSkipped: The architecture takes inputs this check does not make, or cannot run in the compute
            dtype; the reason says which.
    """
    from .layers import apply_vera
    from .modeling import load_model, model_outputs

    dtype = storage_dtype(base)
    compute = compute_dtype(dtype)
    unmerged = apply_vera(load_model(base, compute), [cast_adapter(a, compute) for a in adapters], rounding)
    inputs = architecture_inputs(unmerged)
    try:
        expected = [model_outputs(unmerged, batch) for batch in inputs]
    except (RuntimeError, NotImplementedError) as exc:  # a kernel without this dtype, say
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelCheckSkipped(
            f"{type(unmerged).__name__} cannot run in {str(compute).removeprefix('torch.')} here ({reason[:200]})"
        ) from None
    del unmerged
    merged_model = load_model(merged, compute)
    checks = []
    roundoff = unit_roundoff(dtype)
    for batch, reference in zip(inputs, expected):
        actual = model_outputs(merged_model, batch)
        for key, want in reference.items():
            compared = Comparison.of(actual[key].double().numpy(), want.double().numpy())
            tolerance = MODEL_ROUNDOFFS * roundoff * compared.scale
            shape = "x".join(map(str, next(iter(batch.values())).shape[:2]))
            checks.append(
                Check(
                    f"model {key} [{shape}]",
                    compared.error,
                    compared.error / compared.scale,
                    tolerance,
                    compared.same and compared.error <= tolerance,
                    compared.detail(),
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
