"""The shared VeRA projections `vera_A` and `vera_B`: regenerated bit-exactly without torch's generator.

PEFT draws the projections from `torch.Generator(device="cpu").manual_seed(projection_prng_key)`: first
`vera_A` of shape (r, max_in), then `vera_B` of shape (max_out, r), each Kaiming-uniform with the tensor's own
fan-in (`peft.tuners.vera.model._kaiming_init`). Torch's CPU generator is a 32-bit Mersenne Twister seeded with
`init_genrand(seed mod 2**32)`, which is exactly numpy's `MT19937` with legacy seeding. A float32 uniform sample
takes one 32-bit draw `u` and computes `x = (u & 0xFFFFFF) * 2**-24; x * (high - low) + low` in float32.

Torch compiles that last expression per CPU capability: the AVX2 and AVX-512 kernels (every x86 machine that
trains models today, and aarch64) contract it into a fused multiply-add, the `DEFAULT` kernel (no AVX2) does not,
and the two disagree by one float32 ulp on about half the elements. `Rounding.FMA` reproduces the former and is
the default; `Rounding.SEPARATE` the latter. Both are computed here exactly, independent of the installed torch
and of this machine's CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .options import Rounding

__all__ = ["Rounding", "TorchCPUGenerator", "generate_projections"]


class TorchCPUGenerator:
    """A stream of float32 uniform samples identical to `torch.Generator(device="cpu").manual_seed(seed)`.

    Args:
        seed: The seed passed to `manual_seed`; any Python int (torch keeps it modulo 2**64 and seeds the
            Mersenne Twister with its low 32 bits).
        rounding: Which float32 rounding of torch's uniform kernel to reproduce.
    """

    def __init__(self, seed: int, rounding: Rounding = Rounding.FMA) -> None:
        self._bits = np.random.MT19937(0)
        self._bits._legacy_seeding(seed % 2**32)
        self.rounding = Rounding(rounding)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        """Float32 samples as `torch.empty(shape).uniform_(low, high, generator=...)` draws them, in row-major order."""
        n = math.prod(shape)
        draws = self._bits.random_raw(n) if n else np.empty(0, dtype=np.uint64)
        x = (draws & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)
        low32, high32 = np.float32(low), np.float32(high)
        span = np.float32(high32 - low32)
        if self.rounding is Rounding.FMA:
            # x * span is exact in float64 (24 + 24 bits) and so is adding low32 (the sum spans at most 48 bits),
            # so a single rounding to float32 afterwards is exactly the fused multiply-add.
            values = (x.astype(np.float64) * np.float64(span) + np.float64(low32)).astype(np.float32)
        else:
            values = x * span + low32
        return torch.from_numpy(values.reshape(shape))

    def kaiming_uniform(self, shape: tuple[int, int]) -> torch.Tensor:
        """PEFT's `_kaiming_init`: uniform in +-sqrt(3) * sqrt(2) / sqrt(fan_in), with fan_in = shape[1]."""
        gain = math.sqrt(2)
        std = gain / math.sqrt(shape[1])
        bound = math.sqrt(3.0) * std
        return self.uniform(shape, -bound, bound)


def generate_projections(
    projection_prng_key: int, r: int, max_in: int, max_out: int, rounding: Rounding = Rounding.FMA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regenerate `(vera_A, vera_B)` exactly as PEFT's `VeraModel._init_vera_A_vera_B` draws them.

    Args:
        projection_prng_key: The adapter's `projection_prng_key`.
        r: The adapter's rank.
        max_in: The largest `in_features` over the targeted layers.
        max_out: The largest `out_features` over the targeted layers.
        rounding: Which CPU kernel's rounding to reproduce (see the module docstring).

    Returns:
        float32 tensors of shapes (r, max_in) and (max_out, r).
    """
    generator = TorchCPUGenerator(projection_prng_key, rounding)
    vera_A = generator.kaiming_uniform((r, max_in))
    vera_B = generator.kaiming_uniform((max_out, r))
    return vera_A, vera_B
