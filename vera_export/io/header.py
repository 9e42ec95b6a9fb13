"""Safetensors headers, read and validated before any tensor is: dtypes, shapes, offsets, exact coverage.

Files may be untrusted, so every size in a header is checked against the file before anything is allocated from
it, and the acceptance rules match the `safetensors` library's own (fuzzed against it in the tests).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, quoted

# The `safetensors` library refuses headers above this size (its MAX_HEADER_SIZE); so do we.
MAX_HEADER_BYTES = 100_000_000
# The library parses sizes into u64 and multiplies with overflow checks; torch sizes are signed 64-bit.
_U64_LIMIT = 2**64
MAX_DIM = 2**63 - 1
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
    return _corrupt(path, f"tensor {quoted(name)} {what}")


def is_uint(value: object) -> bool:
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
            raise ValueError(f"duplicate key {quoted(key)}")
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


def parse_json(text: str) -> object:
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
                    path,
                    f"is not a safetensors file: its first 8 bytes, as a header length, pass the {MAX_HEADER_BYTES}-byte limit",
                )
            if 8 + header_len > file_size:
                raise _corrupt(
                    path,
                    f"is not a safetensors file: its first 8 bytes, as a header length, pass its size ({file_size} bytes)",
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; check the path.") from None
    except OSError as e:
        raise CheckpointError(
            f"{path}: cannot be read ({e.strerror or e}); check it is a readable file."
        ) from e
    if len(raw) != header_len:
        raise _corrupt(
            path,
            f"header ended after {len(raw)} bytes, short of its declared length (changed while reading?)",
        )
    try:
        header = parse_json(raw.decode("utf-8"))
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
                path,
                f"__metadata__ entry {quoted(key)} is {quoted(value)}; metadata must map strings to strings",
            )

    data_start = 8 + header_len
    data_size = file_size - data_start
    infos = [_tensor_info(path, name, entry, data_start, data_size) for name, entry in header.items()]
    infos.sort(key=lambda info: (info.offset, info.nbytes))
    _check_coverage(path, infos, data_start, data_size)
    return {info.name: info for info in infos}, metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not _encodes(name):
        raise _corrupt(path, f"tensor name {quoted(name)} is not valid UTF-8")
    if not isinstance(entry, dict):
        raise _tensor_corrupt(path, name, f"is a JSON {type(entry).__name__}, expected an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise _tensor_corrupt(path, name, f"has no {', '.join(missing)}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{path}: tensor {quoted(name)} has dtype {quoted(code)}, which this tool cannot read "
            f"(supported: {', '.join(SAFETENSORS_DTYPES)}); re-save the checkpoint in a supported dtype."
        )
    if not isinstance(shape, list) or not all(is_uint(dim) and dim <= MAX_DIM for dim in shape):
        raise _tensor_corrupt(
            path, name, f"has shape {quoted(shape)}, expected a list of non-negative 64-bit integers"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_uint(o) for o in offsets):
        raise _tensor_corrupt(
            path, name, f"has data_offsets {quoted(offsets)}, expected [begin, end] non-negative integers"
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
                f"after tensor {quoted(previous)}, which ends"
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
                f"starts at data byte {begin}, overlapping tensor {quoted(previous)} which ends at byte {covered}",
            )
        covered, previous = begin + info.nbytes, info.name
    if covered != data_size:
        raise _corrupt(
            path, f"tensors cover {covered} of the {data_size} data bytes; the rest belongs to no tensor"
        )


def truncated_error(info: TensorInfo, done: int) -> CheckpointError:
    return CheckpointError(
        f"{info.path}: tensor {quoted(info.name)} ends at byte {info.offset + info.nbytes} but the file ends at byte "
        f"{info.offset + done}; it was truncated or replaced after its header was checked - re-download it."
    )


def check_info(info: TensorInfo) -> None:
    # A hand-made TensorInfo with a wrong nbytes would read the neighbour's bytes or overrun `out`.
    if info.nbytes != math.prod(info.shape) * info.dtype.itemsize:
        raise ValueError(
            f"{quoted(info.name)}: nbytes {info.nbytes} does not match {info.dtype} {list(info.shape)}"
        )
