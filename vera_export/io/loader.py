"""Read single tensors from safetensors files with plain file reads: one tensor in memory at a time."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import CheckpointError
from .header import TensorInfo, check_info, truncated_error
from .index import ShardedTensorIndex


class LazyTensorLoader:
    """Reads single tensors with plain file reads, keeping one open handle per file.

    Use as a context manager or call `close`. Safetensors data is little-endian, as are the hosts torch runs on.
    """

    def __init__(self, index: ShardedTensorIndex | None = None) -> None:
        """Creates a loader with no file open yet.

        Args:
            index: Lets `get` look tensors up by name; `load` works on any `TensorInfo` without it.
        """
        if sys.byteorder != "little":
            raise NotImplementedError("safetensors data is little-endian; big-endian hosts are not supported")
        self.index = index
        self._files: dict[Path, BinaryIO] = {}

    def get(self, name: str) -> torch.Tensor:
        """Loads the tensor called `name` from the index given at construction."""
        if self.index is None:
            raise ValueError("LazyTensorLoader.get needs the loader to be built with an index")
        if name not in self.index.tensors:
            raise KeyError(f"no tensor {name!r} in {', '.join(str(s) for s in self.index.shards)}")
        return self.load(self.index.tensors[name])

    def load(self, info: TensorInfo) -> torch.Tensor:
        """Reads one tensor into a fresh CPU tensor.

        Raises:
            CheckpointError: The file became unreadable or shorter after its header was checked.
        """
        check_info(info)
        # Raw bytes first: numpy has no bfloat16, but a uint8 buffer can be viewed as any torch dtype.
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        self._read(info, memoryview(buffer.numpy()))
        return buffer.view(info.dtype).reshape(info.shape)

    def load_into(self, info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
        """Reads one tensor into `out`, a contiguous CPU tensor of the same dtype and shape, and returns it.

        Raises:
            ValueError: `out` does not fit `info`.
            CheckpointError: The file became unreadable or shorter after its header was checked.
        """
        check_info(info)
        if out.dtype != info.dtype or tuple(out.shape) != info.shape:
            raise ValueError(
                f"cannot load {info.name!r} ({info.dtype}, {list(info.shape)}) into a tensor of "
                f"{out.dtype}, {list(out.shape)}"
            )
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"load_into needs a contiguous CPU tensor, got one on {out.device}")
        # reshape(-1) first: a 0-dim tensor cannot be viewed as bytes directly.
        self._read(info, memoryview(out.detach().reshape(-1).view(torch.uint8).numpy()))
        return out

    def _read(self, info: TensorInfo, target: memoryview) -> None:
        try:
            f = self._files.get(info.path)
            if f is None:
                # Held open across calls on purpose (a shard serves hundreds of reads); close() releases it.
                f = self._files[info.path] = open(info.path, "rb", buffering=0)  # noqa: SIM115
            f.seek(info.offset)
            done = 0
            while done < info.nbytes:
                n = f.readinto(target[done:])
                if not n:
                    raise truncated_error(info, done)
                done += n
        except OSError as e:
            raise CheckpointError(
                f"{info.path}: cannot read tensor {info.name!r} ({e.strerror or e})."
            ) from e

    def close(self) -> None:
        """Closes every open file."""
        files, self._files = self._files, {}
        for f in files.values():
            f.close()

    def __enter__(self) -> LazyTensorLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_tensors(index: ShardedTensorIndex) -> dict[str, torch.Tensor]:
    """Loads every tensor of `index` into memory: for small files such as adapters, never for a base model."""
    with LazyTensorLoader() as loader:
        return {name: loader.load(info) for name, info in index.tensors.items()}


def tensor_of(spec: TensorInfo | torch.Tensor) -> torch.Tensor:
    """A tensor in memory as it is; one described by its header (`TensorInfo`) read from its file."""
    if isinstance(spec, torch.Tensor):
        return spec.detach()
    with LazyTensorLoader() as loader:
        return loader.load(spec)


def same_bytes(a: TensorInfo, b: TensorInfo, chunk: int = 16 * 1024 * 1024) -> bool:
    """Whether two tensors are stored as the same bytes (dtype, shape and data), read `chunk` bytes at a time.

    Raises:
        CheckpointError: A file became unreadable or shorter after its header was checked.
    """
    if (a.dtype, a.shape, a.nbytes) != (b.dtype, b.shape, b.nbytes):
        return False
    check_info(a)
    check_info(b)
    try:
        with open(a.path, "rb", buffering=0) as fa, open(b.path, "rb", buffering=0) as fb:
            done = 0
            while done < a.nbytes:
                n = min(chunk, a.nbytes - done)
                left, right = (
                    os.pread(fa.fileno(), n, a.offset + done),
                    os.pread(fb.fileno(), n, b.offset + done),
                )
                if len(left) != n:
                    raise truncated_error(a, done + len(left))
                if len(right) != n:
                    raise truncated_error(b, done + len(right))
                if left != right:
                    return False
                done += n
    except OSError as e:
        raise CheckpointError(f"{a.path} or {b.path}: cannot be read ({e.strerror or e}).") from e
    return True
