"""Streaming safetensors reads: validated headers, an index of a whole checkpoint, one tensor at a time.

A 70B checkpoint does not fit in memory twice, so nothing here loads a whole shard: `read_header` parses and
validates one header, `ShardedTensorIndex` does that for every shard of a Hugging Face model directory and
`LazyTensorLoader` reads one tensor with plain file reads (`safetensors_writer` writes them back the same way).
Files may be untrusted, so every size in a header is checked against the file before anything is allocated from
it, and the acceptance rules match the `safetensors` library's own.
"""

import json
import math
import os
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import torch
from typing_extensions import Self  # a torch dependency; typing.Self needs Python 3.11

from vera_export.errors import CheckpointError

SAFE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# The `safetensors` library refuses headers above this size (its MAX_HEADER_SIZE); so do we.
MAX_HEADER_BYTES = 100_000_000
# The library parses sizes into u64 and multiplies with overflow checks; torch sizes are signed 64-bit.
_U64_LIMIT = 2**64
_MAX_DIM = 2**63 - 1
_CORRUPT = "the file is truncated or corrupt - re-download or re-save it."


def _dtype_table() -> dict[str, torch.dtype]:
    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    # The names `safetensors.torch` uses; older torch builds lack some of these dtypes. The sub-byte F4/F6 types
    # are left out: their safetensors shape counts 4- or 6-bit elements, which no torch dtype stores one by one.
    optional = {
        "F8_E4M3": "float8_e4m3fn",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",  # save_file and safe_open know it; safetensors.torch.load does not
        "C64": "complex64",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
    }
    table.update({code: getattr(torch, attr) for code, attr in optional.items() if hasattr(torch, attr)})
    return table


SAFETENSORS_DTYPES: dict[str, torch.dtype] = _dtype_table()
_DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def dtype_to_safetensors(dtype: torch.dtype) -> str:
    """Returns the safetensors dtype string (e.g. ``"BF16"``) for a torch dtype.

    Raises:
        ValueError: safetensors has no code for `dtype` (or this torch build lacks it).
    """
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(
            f"{dtype} cannot be stored in safetensors; supported: {', '.join(SAFETENSORS_DTYPES)}"
        ) from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `offset` is the absolute byte offset of its data in `path`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; {_CORRUPT}")


def _tensor_corrupt(path: Path, name: str, what: str) -> CheckpointError:
    return _corrupt(path, f"tensor {name!r} {what}")


def _is_uint(value: object) -> bool:
    # bool is an int subclass in Python, but `true` is not a size in JSON.
    return type(value) is int and value >= 0


def _encodes(text: str) -> bool:
    # Python's json accepts lone surrogate escapes ("\ud800"); the library's parser rejects them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _no_constants(token: str) -> None:
    raise ValueError(f"{token} is not valid JSON")


def _parse_int(text: str) -> int | float:
    # serde_json, the library's parser, reads "-0" and integers past 20 digits as floats, never as sizes.
    # Turning them into floats here rejects them the same way, and never runs int() on a huge digit string.
    if text == "-0" or len(text.lstrip("-")) > 20:
        return float(text)
    return int(text)


def _parse_json(text: str) -> object:
    """Strict JSON: no NaN/Infinity, no duplicate keys. Raises ValueError or RecursionError."""
    return json.loads(
        text, object_pairs_hook=_unique_keys, parse_constant=_no_constants, parse_int=_parse_int
    )


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Reads and validates the header of one safetensors file without reading any tensor data.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        The tensors in file order (by data offset), and the ``__metadata__`` dict (empty if absent).

    Raises:
        CheckpointError: The file is missing or unreadable, or its header is malformed, names an unknown dtype,
            or its tensors do not exactly cover the data region (the rules of the `safetensors` library).
    """
    path = Path(path)
    try:
        # A FIFO or device would block or never end; safetensors files are regular files.
        if not stat.S_ISREG(path.stat().st_mode):
            raise CheckpointError(f"{path}: is not a regular file; point at a .safetensors file.")
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(
                    path,
                    f"is {file_size} bytes, too short for the 8-byte header length of a safetensors file",
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise _corrupt(
                    path, f"declares a {header_len}-byte header, over the {MAX_HEADER_BYTES}-byte limit"
                )
            if 8 + header_len > file_size:
                raise _corrupt(
                    path, f"declares a {header_len}-byte header but the file is only {file_size} bytes"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; check the path.") from None
    except OSError as e:
        raise CheckpointError(
            f"{path}: cannot be read ({e.strerror or e}); check it is a readable file."
        ) from e
    if len(raw) != header_len:
        raise _corrupt(path, f"header ended after {len(raw)} of {header_len} bytes (changed while reading?)")
    try:
        header = _parse_json(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _corrupt(path, f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"header is a JSON {type(header).__name__}, expected an object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, f"__metadata__ is a JSON {type(metadata).__name__}, expected an object")
    for key, value in metadata.items():
        if not isinstance(value, str) or not _encodes(key) or not _encodes(value):
            raise _corrupt(
                path, f"__metadata__ entry {key!r} is {value!r}; metadata must map strings to strings"
            )

    data_start = 8 + header_len
    data_size = file_size - data_start
    infos = [_tensor_info(path, name, entry, data_start, data_size) for name, entry in header.items()]
    infos.sort(key=lambda info: (info.offset, info.nbytes))
    _check_coverage(path, infos, data_start, data_size)
    return {info.name: info for info in infos}, metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not _encodes(name):
        raise _corrupt(path, f"tensor name {name!r} is not valid UTF-8")
    if not isinstance(entry, dict):
        raise _tensor_corrupt(path, name, f"is a JSON {type(entry).__name__}, expected an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise _tensor_corrupt(path, name, f"has no {', '.join(missing)}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {code!r}, which this tool cannot read "
            f"(supported: {', '.join(SAFETENSORS_DTYPES)}); re-save the checkpoint in a supported dtype."
        )
    if not isinstance(shape, list) or not all(_is_uint(dim) and dim <= _MAX_DIM for dim in shape):
        raise _tensor_corrupt(
            path, name, f"has shape {shape!r}, expected a list of non-negative 64-bit integers"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise _tensor_corrupt(
            path, name, f"has data_offsets {offsets!r}, expected [begin, end] non-negative integers"
        )
    begin, end = offsets
    if begin > end:
        raise _tensor_corrupt(
            path, name, f"declares data_offsets [{begin}, {end}] that end before they begin"
        )
    if end > data_size:
        raise _tensor_corrupt(
            path,
            name,
            f"declares data_offsets [{begin}, {end}] past the end of the file ({data_size} bytes of data)",
        )
    dtype = SAFETENSORS_DTYPES[code]
    # Multiply left to right with the library's u64 overflow check, so [2**40, 2**40, 0] fails there and here.
    numel = 1
    for dim in shape:
        numel *= dim
        if numel >= _U64_LIMIT:
            raise _tensor_corrupt(path, name, f"has shape {shape} whose element count overflows 64 bits")
    nbytes = numel * dtype.itemsize
    if end - begin != nbytes:
        raise _tensor_corrupt(
            path,
            name,
            f"has dtype {code} and shape {shape} ({nbytes} bytes) but data_offsets [{begin}, {end}] "
            f"span {end - begin} bytes",
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, nbytes)


def _check_coverage(path: Path, infos: list[TensorInfo], data_start: int, data_size: int) -> None:
    """The data region must be covered exactly: no gaps, no overlaps, no trailing bytes."""
    covered, previous = 0, None
    for info in infos:
        begin = info.offset - data_start
        if begin > covered:
            after = (
                f"after tensor {previous!r}, which ends"
                if previous is not None
                else "but the data region starts"
            )
            raise _tensor_corrupt(
                path,
                info.name,
                f"starts at data byte {begin} {after} at byte {covered}; "
                f"{begin - covered} bytes in between belong to no tensor",
            )
        if begin < covered:
            raise _tensor_corrupt(
                path,
                info.name,
                f"starts at data byte {begin}, overlapping tensor {previous!r} which ends at byte {covered}",
            )
        covered, previous = begin + info.nbytes, info.name
    if covered != data_size:
        raise _corrupt(
            path, f"tensors cover {covered} of the {data_size} data bytes; the rest belongs to no tensor"
        )


def _check_shard_name(index_path: Path, name: str) -> None:
    pure = PurePosixPath(name)
    # Lexical check only: Hugging Face cache snapshots are symlinks into ../../blobs, so resolving would fail.
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise CheckpointError(
            f"{index_path}: names shard {name!r}, which is not a file inside the model directory; "
            f"shard names must be relative paths without '..' - fix or regenerate the index."
        )


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class ShardedTensorIndex:
    """Every tensor of a safetensors checkpoint, single file or sharded, with all headers validated up front.

    Attributes:
        shards: The files, in index order (sorted by file name) or the single file.
        tensors: Every tensor by name, shard by shard in file order.
        index_metadata: The index's ``metadata`` when sharded (``{}`` if it has none), else None.
        root: The directory the shard names are relative to.
    """

    def __init__(
        self,
        headers: dict[Path, tuple[dict[str, TensorInfo], dict[str, str]]],
        index_metadata: dict | None = None,
        root: Path | None = None,
    ) -> None:
        """Builds an index from already validated headers; prefer `from_dir` or `from_file`.

        Args:
            headers: For each shard, what `read_header` returned for it.
            index_metadata: The ``metadata`` of ``model.safetensors.index.json``, or None for a single file.
            root: The model directory; by default the first shard's.
        """
        self.shards: list[Path] = list(headers)
        self.index_metadata = index_metadata
        self.root = root if root is not None else (self.shards[0].parent if self.shards else Path("."))
        self.tensors: dict[str, TensorInfo] = {}
        self._headers = headers
        for shard, (tensors, _) in headers.items():
            for name, info in tensors.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{shard}: tensor {name!r} is also in {self.tensors[name].path}; "
                        f"a checkpoint must store each tensor once - re-save it."
                    )
                self.tensors[name] = info

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Self:
        """Indexes one safetensors file (e.g. ``adapter_model.safetensors``)."""
        path = Path(path)
        return cls({path: read_header(path)})

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> Self:
        """Indexes a Hugging Face model directory.

        Like transformers, a ``model.safetensors`` wins over ``model.safetensors.index.json`` when both exist.
        Shard files the index does not name are ignored, as transformers ignores them.

        Raises:
            CheckpointError: No safetensors weights, an invalid index, missing shards, or an index that
                disagrees with its shards.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CheckpointError(f"{model_dir}: not a directory; pass a Hugging Face model directory.")
        if (model_dir / SAFE_WEIGHTS_NAME).is_file():
            return cls.from_file(model_dir / SAFE_WEIGHTS_NAME)
        index_path = model_dir / INDEX_NAME
        if not index_path.is_file():
            raise _no_weights_error(model_dir)
        weight_map, index_metadata = _read_index(index_path)

        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (model_dir / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path}: names shards that are missing: {_listing(missing)}; "
                f"the download is incomplete - download them again."
            )
        headers = {model_dir / name: read_header(model_dir / name) for name in shard_names}

        problems = []
        for name, shard_name in weight_map.items():
            if name not in headers[model_dir / shard_name][0]:
                problems.append(f"tensor {name!r} is listed for {shard_name} but that shard does not hold it")
        for shard_name in shard_names:
            for name in headers[model_dir / shard_name][0]:
                if name not in weight_map:
                    problems.append(f"{shard_name} holds tensor {name!r}, which the index does not list")
                elif weight_map[name] != shard_name:
                    problems.append(
                        f"{shard_name} holds tensor {name!r}, which the index puts in {weight_map[name]}"
                    )
        if problems:
            raise CheckpointError(
                f"{index_path}: the index and its shards disagree: {_listing(problems)}; "
                f"re-download the checkpoint or re-save it."
            )
        return cls(headers, index_metadata, root=model_dir)

    @property
    def is_sharded(self) -> bool:
        """Whether the checkpoint came with a ``model.safetensors.index.json``."""
        return self.index_metadata is not None

    @property
    def weight_map(self) -> dict[str, str]:
        """Tensor name to shard file name, as an index file lists them."""
        return {name: self.shard_name(info.path) for name, info in self.tensors.items()}

    def shard_name(self, shard: Path) -> str:
        """The shard's name as the index gives it: its path relative to the model directory (usually a file name)."""
        return shard.relative_to(self.root).as_posix()

    def _shard(self, shard: str | os.PathLike[str]) -> Path:
        path = Path(shard)
        if path in self._headers:
            return path
        for candidate in self.shards:
            if candidate.name == str(shard):
                return candidate
        raise KeyError(f"{shard} is not a shard of this checkpoint; shards: {[str(s) for s in self.shards]}")

    def shard_tensors(self, shard: str | os.PathLike[str]) -> list[TensorInfo]:
        """The tensors of one shard (a path from `shards`, or its file name), in file order."""
        return list(self._headers[self._shard(shard)][0].values())

    def metadata(self, shard: str | os.PathLike[str]) -> dict[str, str]:
        """The ``__metadata__`` of one shard (a path from `shards`, or its file name)."""
        return dict(self._headers[self._shard(shard)][1])


def _no_weights_error(model_dir: Path) -> CheckpointError:
    message = f"{model_dir}: no safetensors weights (expected {SAFE_WEIGHTS_NAME} or {INDEX_NAME})"
    pickles = sorted(p.name for p in model_dir.glob("pytorch_model*.bin"))
    if pickles:
        message += (
            f"; it has {_listing(pickles)}, a pickle, which is not loaded because unpickling can run "
            f"arbitrary code - convert it to safetensors (e.g. save_pretrained(..., safe_serialization=True))"
        )
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if others:
        message += f"; other safetensors files are there ({_listing(others)}) - pass one of them as a file"
    return CheckpointError(message + ".")


def _read_index(index_path: Path) -> tuple[dict[str, str], dict]:
    try:
        index = _parse_json(index_path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot be read ({e.strerror or e}).") from e
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{index_path}: is not valid JSON ({e}); re-download it.") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: has no weight_map object listing the tensors; re-download it.")
    for name, shard_name in weight_map.items():
        if not isinstance(shard_name, str):
            raise CheckpointError(
                f"{index_path}: maps tensor {name!r} to {shard_name!r}, expected a file name."
            )
        _check_shard_name(index_path, shard_name)
    metadata = index.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{index_path}: metadata is a JSON {type(metadata).__name__}, expected an object."
        )
    return weight_map, metadata


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
        _check_info(info)
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
        _check_info(info)
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
                    raise _truncated(info, done)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_tensors(index: ShardedTensorIndex) -> dict[str, torch.Tensor]:
    """Loads every tensor of `index` into memory: for small files such as adapters, never for a base model."""
    with LazyTensorLoader() as loader:
        return {name: loader.load(info) for name, info in index.tensors.items()}


def _truncated(info: TensorInfo, done: int) -> CheckpointError:
    return CheckpointError(
        f"{info.path}: tensor {info.name!r} ends at byte {info.offset + info.nbytes} but the file ends at byte "
        f"{info.offset + done}; it was truncated or replaced after its header was checked - re-download it."
    )


def _check_info(info: TensorInfo) -> None:
    # A hand-made TensorInfo with a wrong nbytes would read the neighbour's bytes or overrun `out`.
    if info.nbytes != math.prod(info.shape) * info.dtype.itemsize:
        raise ValueError(
            f"{info.name!r}: nbytes {info.nbytes} does not match {info.dtype} {list(info.shape)}"
        )
