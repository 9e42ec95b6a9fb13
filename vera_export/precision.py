"""Floating point facts the fold and its checks share: compute dtypes, significands, ulps, error bounds, and
exact arithmetic for the few elements where float64 cannot vouch for a sum."""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

# Precision the fold runs in, by weight dtype.
_COMPUTE_DTYPES = {
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
    torch.float32: torch.float64,
    torch.float64: torch.float64,
}
FOLDABLE_DTYPES = frozenset(_COMPUTE_DTYPES)
SIGNIFICAND_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight of `weight_dtype` is folded in: float32 for 16-bit weights, float64 for float32."""
    try:
        return _COMPUTE_DTYPES[weight_dtype]
    except KeyError:
        raise TypeError(
            f"cannot fold into a {weight_dtype} weight; only floating point weights are adapted"
        ) from None


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the spacing of `dtype` at 1: the largest relative error of rounding to nearest in `dtype`."""
    return 2.0 ** -SIGNIFICAND_BITS[dtype]


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The unit in the last place of `values` (any float tensor) if they were stored in `dtype`, as float64.

    From the bits: a float64's exponent field alone is the power of two at or below it, so the spacing is that
    times `2**(1 - digits)`, at least the spacing of `dtype`'s subnormals (which is also zero's). Infinity's is
    infinite, NaN's NaN. Several times faster than `frexp` and `ldexp`, which the verification called per weight.
    """
    info = torch.finfo(dtype)
    digits = SIGNIFICAND_BITS[dtype]
    smallest = math.ldexp(info.tiny, 1 - digits)  # spacing of subnormals, and of zero
    magnitudes = values.double().abs()
    power = (magnitudes.view(torch.int64) & 0x7FF0_0000_0000_0000).view(torch.float64)
    spacing = power.mul_(2.0 ** (1 - digits)).clamp_min_(smallest)
    if all_finite(magnitudes):
        return spacing
    return torch.where(magnitudes.isnan(), magnitudes, spacing)


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's `gamma_n = n u / (1 - n u)`: bounds the relative error of n roundings in `dtype`."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def smallest_magnitude(tensor: torch.Tensor) -> float:
    """The smallest non-zero |element| (in float64), or infinity when there is none."""
    magnitudes = tensor.abs().double()
    return magnitudes.masked_fill_(magnitudes == 0, math.inf).min().item() if tensor.numel() else math.inf


def largest_magnitude(tensor: torch.Tensor) -> float:
    """The largest |element| (in float64), or 0 when there is none."""
    return tensor.abs().double().max().item() if tensor.numel() else 0.0


def all_finite(values: torch.Tensor) -> bool:
    """Whether `values` holds no NaN and no Inf: one reduction (min and max propagate NaN), where `isfinite` on a
    16-bit tensor costs about 30 times as much on the CPU."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def narrow(
    values: torch.Tensor,
    dtype: torch.dtype,
    single: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`values` rounded once, to nearest, to `dtype`; into `out` (of `values`' shape, any device) when given.

    torch rounds float64 to float16 and bfloat16 by way of float32, twice, which can land one ulp off at a
    midpoint, and turn a sum just below the overflow threshold into infinity. The second rounding can only go wrong
    where the first landed exactly halfway between two `dtype` values (the bits below `dtype`'s last are 1 then
    zeros) or, for float16, outside its normal range, where its spacing is not float32's shifted: those few
    elements are rounded the careful way (`_narrow_carefully`), the others keep torch's result. `single`, when
    given, is `values` already rounded to float32 (contiguous): the first rounding, not done again.
    """
    if values.dtype != torch.float64 or dtype in (torch.float32, torch.float64):
        return values.to(dtype) if out is None else out.copy_(values)
    single = (values.to(torch.float32) if single is None else single).reshape(-1)
    direct = out is not None and out.is_contiguous() and out.device == values.device
    result = out.view(-1).copy_(single) if direct else single.to(dtype)
    if dtype == torch.bfloat16 and sys.byteorder == "little":
        # float32's exponent range: subnormals and overflow follow the same bits. The low 16 bits of each float32
        # are every other int16 of its bytes: one strided comparison, no arithmetic pass.
        careful = single.view(torch.int16)[0::2] == -0x8000
    elif dtype == torch.bfloat16:
        careful = (single.view(torch.int32) & 0xFFFF) == 0x8000
    else:
        magnitude = single.abs()
        careful = (
            ((single.view(torch.int32) & 0x1FFF) == 0x1000)
            | ~(magnitude >= 2.0**-14)
            | (magnitude >= 65504.0)
        )
    index = sparse_nonzero(careful)
    if index.numel():
        result[index] = _narrow_carefully(values.reshape(-1)[index], dtype)
    if out is None:
        return result.view(values.shape)
    return out if direct else out.copy_(result.view(values.shape))


_SPAN = 64  # elements of a mask looked at together, as eight int64, by `sparse_nonzero`


def sparse_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """The flat indices of a boolean mask's True elements, ascending, as `mask.view(-1).nonzero()`, several times
    faster when few are True (a block's suspects, a rounding's ties): spans of `_SPAN` elements are tested eight
    bytes at a time, and only the spans that hit are searched, gathered in one go. One plain `nonzero` past one
    hit span in eight, or for a mask that cannot be viewed as int64."""
    flat = mask.reshape(-1)
    whole = flat.numel() - flat.numel() % _SPAN
    if not whole or flat.storage_offset() % 8 or not flat.is_contiguous():
        return flat.nonzero().squeeze(1)
    blocks = flat[:whole].view(-1, _SPAN)
    spans = blocks.view(torch.int64).any(dim=1).nonzero().squeeze(1)
    if spans.numel() * 8 > len(blocks):
        return flat.nonzero().squeeze(1)
    hits = blocks[spans].nonzero()
    return torch.cat([spans[hits[:, 0]] * _SPAN + hits[:, 1], flat[whole:].nonzero().squeeze(1) + whole])


def _narrow_carefully(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rounding to odd in float32 first (toward zero, then the last bit set if anything was lost) keeps the
    information the second rounding needs: float32's 24 bits are at least 2 more than float16's 11 and bfloat16's 8.
    """
    nearest = values.to(torch.float32)
    toward_zero = torch.where(
        nearest.double().abs() > values.abs(), torch.nextafter(nearest, torch.zeros_like(nearest)), nearest
    )
    inexact = toward_zero.double() != values
    odd = torch.where(inexact, toward_zero.view(torch.int32) | 1, toward_zero.view(torch.int32))
    return odd.view(torch.float32).to(dtype)


def exact_sums(w: torch.Tensor, left_rows: torch.Tensor, right_cols: torch.Tensor) -> torch.Tensor:
    """`w + sum(left_rows * right_cols, dim=1)` correctly rounded to float64, via error-free products.

    Factors are exact products of two float32 values: float64 numbers between about 1e-90 and 1e77. Veltkamp's
    split cuts each into two halves of at most 26 significant bits, so every partial product is exact in float64
    (far from its underflow), and `math.fsum` adds exactly.
    """
    l_hi, l_lo = _split(left_rows.cpu().numpy())
    r_hi, r_lo = _split(right_cols.cpu().numpy())
    parts = np.concatenate([l_hi * r_hi, l_hi * r_lo, l_lo * r_hi, l_lo * r_lo], axis=1)
    sums = [math.fsum([wk, *row]) for wk, row in zip(w.cpu().tolist(), parts)]
    return torch.tensor(sums, dtype=torch.float64)


def _split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Veltkamp's split: `x = hi + lo` exactly, each with at most 26 significant bits (for |x| below 1e300)."""
    c = x * 134217729.0  # 2**27 + 1
    hi = c - (c - x)
    return hi, x - hi
