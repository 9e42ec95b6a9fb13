"""Safetensors test data: random bit patterns, and files with any header at all."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from vera_export.io.header import SAFETENSORS_DTYPES

UP = "model.layers.0.mlp.up_proj.weight"
SHAPES = [(), (0,), (3, 0), (2, 3)]
SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns (NaN payloads included), so comparisons are of bits, not of values."""
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(as_bytes(actual), as_bytes(expected))


def write_raw(path: Path, header: object, data: bytes = b"", header_len: int | None = None) -> Path:
    """A file with any header: a JSON-able object, or str/bytes written verbatim."""
    raw = (
        header
        if isinstance(header, bytes)
        else (header if isinstance(header, str) else json.dumps(header)).encode()
    )
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def mixed_tensors(code: str) -> dict[str, torch.Tensor]:
    dtype = SAFETENSORS_DTYPES[code]
    tensors = {f"t{i}": random_tensor(dtype, shape, i) for i, shape in enumerate(SHAPES)}
    # Another dtype makes the library reorder tensors by alignment, so file order differs from name order.
    tensors["other"] = random_tensor(torch.float16 if dtype == torch.float32 else torch.float32, (5,), 99)
    return tensors
