"""Tests for vera_export.safetensors_io and safetensors_writer, with the `safetensors` library as the reference for
every format rule."""

import errno
import fcntl
import json
import math
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, safe_open, save_file

from vera_export.errors import CheckpointError
from vera_export.io import writer as safetensors_writer
from vera_export.io.header import (
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPES,
    TensorInfo,
    dtype_to_safetensors,
    read_header,
)
from vera_export.io.index import INDEX_NAME, ShardedTensorIndex
from vera_export.io.loader import LazyTensorLoader, load_tensors
from vera_export.io.writer import SafetensorsWriter, write_index

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


# --- dtypes ---------------------------------------------------------------------------------------------------


def test_dtype_table_matches_the_library():
    required = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
    assert required <= set(SAFETENSORS_DTYPES)
    optional = {
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
    }
    assert {code for code, attr in optional.items() if hasattr(torch, attr)} <= set(SAFETENSORS_DTYPES)
    library = getattr(safetensors.torch, "_TYPES", {})  # private, but the library's own table
    assert {code: SAFETENSORS_DTYPES.get(code) for code in library} == library
    assert SAFETENSORS_DTYPES.get("F8_E8M0") == getattr(torch, "float8_e8m0fnu", None)


def test_dtype_to_safetensors_inverts_the_table():
    for code, dtype in SAFETENSORS_DTYPES.items():
        assert dtype_to_safetensors(dtype) == code
    with pytest.raises(ValueError, match="complex128"):
        dtype_to_safetensors(torch.complex128)


# --- round trips against the library ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(SAFETENSORS_DTYPES))
def test_library_files_load_bit_identically(tmp_path, code):
    tensors = mixed_tensors(code)
    path = tmp_path / "lib.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})

    infos, metadata = read_header(path)

    assert metadata == {"format": "pt"}
    assert set(infos) == set(tensors)
    offsets = [info.offset for info in infos.values()]
    assert offsets == sorted(offsets)
    with LazyTensorLoader() as loader:
        for name, info in infos.items():
            assert (info.name, info.path) == (name, path)
            assert (info.dtype, info.shape) == (tensors[name].dtype, tuple(tensors[name].shape))
            assert_same_bits(loader.load(info), tensors[name])
            out = torch.empty(info.shape, dtype=info.dtype)
            out.reshape(-1).view(torch.uint8).fill_(0xAB)
            assert loader.load_into(info, out) is out
            assert_same_bits(out, tensors[name])


@pytest.mark.parametrize("code", sorted(SAFETENSORS_DTYPES))
def test_written_files_equal_library_files_byte_for_byte(tmp_path, code):
    tensors = mixed_tensors(code)
    library_path, ours = tmp_path / "lib.safetensors", tmp_path / "ours.safetensors"
    save_file(tensors, library_path, metadata={"format": "pt"})
    order = list(read_header(library_path)[0])  # the library's order: by dtype alignment, then name

    with SafetensorsWriter(
        ours, [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in order], {"format": "pt"}
    ) as w:
        for name in order:
            w.write(name, tensors[name])

    assert ours.read_bytes() == library_path.read_bytes()
    loaded = load_file(ours)
    with safe_open(ours, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert_same_bits(loaded[name], tensor)
            assert_same_bits(f.get_tensor(name), tensor)


# One metadata key at most: the library keeps metadata in a Rust HashMap, so it writes several in random order.
@pytest.mark.parametrize("metadata", [None, {}, {'qu"ote\\ é\n\x01': 'qu"ote\\ é\n\x01\x7f'}])
def test_header_bytes_match_the_library_including_escapes(tmp_path, metadata):
    tensors = {
        'we"ird\\name\n\x7f': torch.ones(3),
        "é": torch.zeros(2, dtype=torch.bfloat16),
        "z": torch.ones(()),
    }
    library_path, ours = tmp_path / "lib.safetensors", tmp_path / "ours.safetensors"
    save_file(tensors, library_path, metadata=metadata)
    order = list(read_header(library_path)[0])

    with SafetensorsWriter(
        ours, [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in order], metadata
    ) as w:
        for name in order:
            w.write(name, tensors[name])

    assert ours.read_bytes() == library_path.read_bytes()


def test_writer_in_any_order_loads_in_the_library(tmp_path):
    tensors = mixed_tensors("BF16")
    path = tmp_path / "ours.safetensors"
    names = sorted(tensors, reverse=True)
    with SafetensorsWriter(path, [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]) as w:
        for name in names:
            w.write(name, tensors[name])

    assert list(read_header(path)[0]) == names
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 8 == 0  # padded so the data starts 8-aligned
    with safe_open(path, framework="pt") as f:
        assert f.metadata() is None
    for name, tensor in load_file(path).items():
        assert_same_bits(tensor, tensors[name])


def test_writer_writes_strided_and_conjugated_tensors_as_their_values(tmp_path):
    strided = random_tensor(torch.bfloat16, (3, 4), 1).t()
    conjugated = random_tensor(torch.float32, (2, 2), 2).view(torch.complex64).conj()
    path = tmp_path / "ours.safetensors"
    with SafetensorsWriter(path, [("s", torch.bfloat16, (4, 3)), ("c", torch.complex64, (2, 1))]) as w:
        w.write("s", strided)
        w.write("c", conjugated)

    loaded = load_file(path)
    assert_same_bits(loaded["s"], strided.contiguous())
    assert_same_bits(loaded["c"], conjugated.resolve_conj())


# --- writer misuse is a bug: ValueError --------------------------------------------------------------------------


def test_writer_rejects_out_of_order_and_mismatched_tensors(tmp_path):
    path = tmp_path / "ours.safetensors"
    w = SafetensorsWriter(path, [("a", torch.float32, (2,)), ("b", torch.bfloat16, (1, 3))])
    with pytest.raises(ValueError, match="got 'b' but 'a' is next"):
        w.write("b", torch.zeros(1, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="declared torch.float32"):
        w.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"got torch.float32 \[3\]"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="before writing 1 declared tensors: 'b'"):
        w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write("b", torch.zeros(1, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("fsync", [True, False])
def test_writer_fsyncs_on_close_when_asked(tmp_path, monkeypatch, fsync):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_size))
    with SafetensorsWriter(tmp_path / "o.safetensors", [("a", torch.float32, (3,))], fsync=fsync) as w:
        w.write("a", torch.ones(3))
        assert synced == []
    assert synced == ([(tmp_path / "o.safetensors").stat().st_size] if fsync else [])


def test_writer_rejects_writes_past_the_last_entry(tmp_path):
    with SafetensorsWriter(tmp_path / "o.safetensors", [("a", torch.float32, ())]) as w:
        w.write("a", torch.zeros(()))
        with pytest.raises(ValueError, match="all 1 tensors are written"):
            w.write("a", torch.zeros(()))


@pytest.mark.parametrize(
    ("entries", "metadata", "match"),
    [
        ([("a", torch.float32, (1,)), ("a", torch.float32, (1,))], None, "repeated"),
        ([("__metadata__", torch.float32, (1,))], None, "reserved"),
        ([("a", torch.complex128, (1,))], None, "cannot be stored"),
        ([("a", torch.float32, (-1,))], None, "non-negative"),
        ([("a", torch.float32, (1,))], {"format": 1}, "strings to strings"),
    ],
)
def test_writer_rejects_bad_entries_before_creating_the_file(tmp_path, entries, metadata, match):
    path = tmp_path / "o.safetensors"
    with pytest.raises(ValueError, match=match):
        SafetensorsWriter(path, entries, metadata)
    assert not path.exists()


def test_writer_closes_without_checks_when_the_block_raises(tmp_path):
    path = tmp_path / "o.safetensors"
    with (
        pytest.raises(RuntimeError, match="boom"),
        SafetensorsWriter(path, [("a", torch.float32, (1,))]) as w,
    ):  # not masked by the "not all written" ValueError
        raise RuntimeError("boom")
    assert path.exists()  # deleting the partial file is the caller's job
    w.close()  # already closed: no ValueError about the unwritten tensor


# --- copy_from -------------------------------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {
        "embed": random_tensor(torch.bfloat16, (4, 3), 1),
        "scalar": random_tensor(torch.float32, (), 2),
        "empty": random_tensor(torch.float16, (0, 2), 3),
        "norm": random_tensor(torch.float32, (7,), 4),
    }
    path = tmp_path / "src.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def copy_all(source_path: Path, out_path: Path, direct: bool = True) -> None:
    infos, metadata = read_header(source_path)
    entries = [(i.name, i.dtype, i.shape) for i in infos.values()]
    with SafetensorsWriter(out_path, entries, metadata, direct=direct) as w:
        for info in infos.values():
            w.copy_from(info.name, info)


@pytest.mark.parametrize("direct", [True, False])
def test_copy_from_is_byte_identical(tmp_path, source, direct):
    copy_all(source[0], tmp_path / "out.safetensors", direct=direct)
    assert (tmp_path / "out.safetensors").read_bytes() == source[0].read_bytes()


@pytest.mark.parametrize("mode", ["no_copy_file_range", "exdev", "partial_then_exdev", "copies_nothing"])
def test_copy_from_fallback_is_byte_identical(tmp_path, source, monkeypatch, mode):
    monkeypatch.setattr(safetensors_writer, "COPY_CHUNK_BYTES", 5)  # many short chunks
    real = getattr(os, "copy_file_range", None)
    calls = []

    def refusing_copy(src: int, dst: int, count: int, offset_src: int | None = None, *_: object) -> int:
        calls.append(count)
        if mode == "partial_then_exdev" and len(calls) == 1:
            return real(src, dst, min(count, 3), offset_src)
        if mode == "copies_nothing":  # what some filesystems answered before Linux 5.19
            return 0
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    if mode == "no_copy_file_range":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    elif mode == "partial_then_exdev" and real is None:
        pytest.skip("needs os.copy_file_range")
    else:
        monkeypatch.setattr(os, "copy_file_range", refusing_copy, raising=False)

    copy_all(source[0], tmp_path / "out.safetensors", direct=False)

    assert (tmp_path / "out.safetensors").read_bytes() == source[0].read_bytes()
    assert bool(calls) == (mode != "no_copy_file_range")


def test_copy_from_keeps_other_os_errors(tmp_path, source, monkeypatch):
    def failing_copy(*_: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", failing_copy, raising=False)
    info = read_header(source[0])[0]["norm"]
    with (
        pytest.raises(OSError) as caught,
        SafetensorsWriter(tmp_path / "o.safetensors", [("norm", info.dtype, info.shape)], direct=False) as w,
    ):
        w.copy_from("norm", info)
    assert caught.value.errno == errno.EIO


@pytest.mark.parametrize("kernel_copy", [True, False, "direct"])
def test_copy_from_truncated_source_names_file_and_tensor(tmp_path, source, monkeypatch, kernel_copy):
    if kernel_copy is False:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    elif not hasattr(os, "copy_file_range"):
        pytest.skip("needs os.copy_file_range")
    path = source[0]
    info = max(read_header(path)[0].values(), key=lambda i: i.offset + i.nbytes)
    with open(path, "r+b") as f:
        f.truncate(info.offset + 1)

    with (
        pytest.raises(CheckpointError, match="truncated") as caught,
        SafetensorsWriter(
            tmp_path / "o.safetensors", [(info.name, info.dtype, info.shape)], direct=kernel_copy == "direct"
        ) as w,
    ):
        w.copy_from(info.name, info)
    assert path.name in str(caught.value)
    assert repr(info.name) in str(caught.value)


def test_copy_from_checks_the_entry_and_the_source(tmp_path, source):
    infos = read_header(source[0])[0]
    with (
        pytest.raises(ValueError, match="declared"),
        SafetensorsWriter(tmp_path / "o.safetensors", [("norm", torch.float16, (7,))]) as w,
    ):
        w.copy_from("norm", infos["norm"])
    source[0].unlink()
    with (
        pytest.raises(CheckpointError, match="src.safetensors.*'norm'"),
        SafetensorsWriter(tmp_path / "o.safetensors", [("norm", torch.float32, (7,))]) as w,
    ):
        w.copy_from("norm", infos["norm"])


# --- LazyTensorLoader --------------------------------------------------------------------------------------------


def test_loader_reports_a_file_truncated_after_its_header_was_read(source):
    path = source[0]
    info = max(read_header(path)[0].values(), key=lambda i: i.offset + i.nbytes)
    with open(path, "r+b") as f:
        f.truncate(info.offset + 1)
    with LazyTensorLoader() as loader, pytest.raises(CheckpointError, match="truncated") as caught:
        loader.load(info)
    assert path.name in str(caught.value) and repr(info.name) in str(caught.value)


def test_loader_reports_a_file_removed_after_its_header_was_read(source):
    info = read_header(source[0])[0]["norm"]
    source[0].unlink()
    with LazyTensorLoader() as loader, pytest.raises(CheckpointError, match="src.safetensors.*'norm'"):
        loader.load(info)


def test_load_into_rejects_tensors_that_do_not_fit(source):
    info = read_header(source[0])[0]["embed"]  # bf16 (4, 3)
    with LazyTensorLoader() as loader:
        with pytest.raises(ValueError, match="cannot load 'embed'"):
            loader.load_into(info, torch.empty(4, 3, dtype=torch.float16))
        with pytest.raises(ValueError, match="cannot load 'embed'"):
            loader.load_into(info, torch.empty(3, 4, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="contiguous"):
            loader.load_into(info, torch.empty(3, 4, dtype=torch.bfloat16).t())


def test_loader_rejects_an_inconsistent_tensor_info(source):
    info = read_header(source[0])[0]["norm"]
    forged = TensorInfo(info.name, info.dtype, info.shape, info.path, info.offset, info.nbytes + 4)
    with LazyTensorLoader() as loader, pytest.raises(ValueError, match="nbytes"):
        loader.load(forged)


def test_loader_keeps_one_handle_per_file_and_closes_them(source):
    infos = read_header(source[0])[0]
    with LazyTensorLoader() as loader:
        for info in infos.values():
            loader.load(info)
        handles = list(loader._files.values())
        assert len(handles) == 1
    assert handles[0].closed


# --- read_header: every malformed header is a CheckpointError naming file and tensor -----------------------------

ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
DATA = bytes(16)


def entry(**changes: object) -> dict[str, object]:
    return {key: value for key, value in {**ENTRY, **changes}.items() if value is not None}


def case(case_id: str, header: object, fragment: str, data: bytes = DATA, **kw: object) -> object:
    """A malformed file: `fragment` must be in the message, which must name `tensor` (None: no tensor)."""
    kw = {"header_len": None, "tensor": UP, "library_accepts": False, **kw}
    return pytest.param(
        header, data, kw["header_len"], fragment, kw["tensor"], kw["library_accepts"], id=case_id
    )


NO_TENSOR = {"tensor": None}
HEADER_CASES = [
    case("short_file", None, "too short", **NO_TENSOR),
    case("header_over_cap", {UP: ENTRY}, "limit", header_len=MAX_HEADER_BYTES + 1, **NO_TENSOR),
    case("header_past_file_end", {UP: ENTRY}, "declares a 10000-byte header", header_len=10_000, **NO_TENSOR),
    case("not_utf8", b'{"\xff": 1}', "UTF-8", **NO_TENSOR),
    case("not_json", '{"a": ', "not valid JSON", **NO_TENSOR),
    case("not_an_object", "[]", "expected an object", **NO_TENSOR),
    case("nan", '{"__metadata__": {"a": NaN}}', "not valid JSON", **NO_TENSOR),
    case("deep_nesting", '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON", **NO_TENSOR),
    # The library keeps the last of two same-named tensors; an ambiguous file is refused here.
    case(
        "duplicate_tensor",
        f'{{"{UP}": {json.dumps(ENTRY)}, "{UP}": {json.dumps(ENTRY)}}}',
        "duplicate key",
        library_accepts=True,
    ),
    case("metadata_not_str", {"__metadata__": {"format": 1}, UP: ENTRY}, "strings to strings", **NO_TENSOR),
    case("metadata_not_object", {"__metadata__": ["pt"], UP: ENTRY}, "__metadata__", **NO_TENSOR),
    case("lone_surrogate_name", '{"\\ud800": ' + json.dumps(ENTRY) + "}", "UTF-8", **NO_TENSOR),
    case("entry_not_object", {UP: [1, 2]}, "expected an object"),
    case("no_dtype", {UP: entry(dtype=None)}, "has no dtype"),
    case("no_shape", {UP: entry(shape=None)}, "has no shape"),
    case("no_offsets", {UP: entry(data_offsets=None)}, "has no data_offsets"),
    case("unknown_dtype", {UP: entry(dtype="XYZ")}, "cannot read"),
    # The library reads F4 (packed 4-bit floats); we do not, and say so.
    case("dtype_f4", {UP: entry(dtype="F4", shape=[32])}, "cannot read", library_accepts=True),
    case("shape_not_list", {UP: entry(shape=4)}, "has shape 4"),
    case("shape_negative", {UP: entry(shape=[-2, -2])}, "non-negative"),
    case(
        "shape_minus_zero",
        '{"' + UP + '": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}',
        "has shape [-0.0]",
        b"",
    ),
    case("shape_float", {UP: entry(shape=[2.0, 2])}, "has shape"),
    case("shape_bool", {UP: entry(shape=[True, 4])}, "has shape"),
    case(
        "shape_many_digits",
        '{"' + UP + '": {"dtype": "F32", "shape": [1' + "0" * 5000 + '], "data_offsets": [0, 16]}}',
        "has shape [inf]",
    ),
    case("offsets_one_int", {UP: entry(data_offsets=[16])}, "data_offsets [16]"),
    case("offsets_str", {UP: entry(data_offsets=["0", 16])}, "data_offsets"),
    case("offsets_reversed", {UP: entry(data_offsets=[16, 0])}, "end before they begin"),
    case("size_mismatch", {UP: entry(shape=[2, 3])}, "(24 bytes) but data_offsets [0, 16]"),
    case(
        "past_end",
        {UP: entry(data_offsets=[0, 9_999_999])},
        "declares data_offsets [0, 9999999] past the end of the file (16 bytes of data)",
    ),
    case("huge_shape", {UP: entry(shape=[2**40], data_offsets=[0, 16])}, "span 16 bytes"),
    case("huge_shape_past_end", {UP: entry(shape=[2**40], data_offsets=[0, 2**42])}, "past the end"),
    case("numel_overflow", {UP: entry(shape=[2**40, 2**40, 0], data_offsets=[0, 0])}, "overflows", b""),
    # The library accepts this, but torch cannot build a tensor with a dimension of 2**64 - 1.
    case(
        "dim_past_int64",
        {UP: entry(shape=[2**64 - 1, 0], data_offsets=[0, 0])},
        "64-bit",
        b"",
        library_accepts=True,
    ),
    case("gap_at_start", {UP: entry(data_offsets=[4, 20])}, "4 bytes in between", bytes(20)),
    case("gap_between", {"a": ENTRY, UP: entry(data_offsets=[20, 36])}, "after tensor 'a'", bytes(36)),
    case("overlap", {"a": ENTRY, UP: entry(data_offsets=[8, 24])}, "overlapping tensor 'a'", bytes(24)),
    case("trailing_bytes", {UP: ENTRY}, "cover 16 of the 20 data bytes", bytes(20), **NO_TENSOR),
]


@pytest.mark.parametrize(
    ("header", "data", "header_len", "fragment", "tensor", "library_accepts"), HEADER_CASES
)
def test_read_header_rejects(tmp_path, header, data, header_len, fragment, tensor, library_accepts):
    path = tmp_path / "model-00001-of-00002.safetensors"
    if header is None:
        path.write_bytes(b"\x01\x02\x03")
    else:
        write_raw(path, header, data, header_len)

    with pytest.raises(CheckpointError) as caught:
        read_header(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert fragment in message
    if tensor is not None:
        assert repr(tensor) in message
    if library_accepts:
        safetensors.deserialize(path.read_bytes())  # we are stricter on purpose
    else:
        with pytest.raises(Exception):  # noqa: B017 - any error: the library's types vary by version
            load_file(path)


def test_read_header_accepts_what_the_library_accepts(tmp_path):
    header = (
        ' \t{"__metadata__": null, "b": {"dtype": "I8", "shape": [], "data_offsets": [4, 5], "extra": [1, {}]},'
        ' "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},'
        ' "a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}\n'
    )
    path = write_raw(tmp_path / "ok.safetensors", header, bytes(range(5)))

    infos, metadata = read_header(path)

    assert metadata == {}
    assert list(infos) == ["e", "a", "b"]  # data order; the empty tensor sorts first
    assert [(i.offset - infos["e"].offset, i.nbytes) for i in infos.values()] == [(0, 0), (0, 4), (4, 1)]
    assert set(load_file(path)) == set(infos)


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [("missing", "file not found"), ("directory", "not a regular file"), ("device", "not a regular file")],
)
def test_read_header_names_a_missing_or_unreadable_file(tmp_path, kind, fragment):
    path = tmp_path / "model.safetensors"
    if kind == "directory":
        path.mkdir()
    elif kind == "device":
        path.symlink_to(os.devnull)  # a FIFO or device could block or never end
    with pytest.raises(CheckpointError, match=fragment) as caught:
        read_header(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_read_header_allocates_nothing_from_claimed_sizes(tmp_path):
    claims = [
        write_raw(tmp_path / "len.safetensors", {UP: ENTRY}, DATA, header_len=2**63),
        write_raw(tmp_path / "len2.safetensors", {UP: ENTRY}, DATA, header_len=MAX_HEADER_BYTES),
        write_raw(tmp_path / "shape.safetensors", {UP: entry(shape=[2**40, 2**20], data_offsets=[0, 2**62])}),
    ]
    tracemalloc.start()
    try:
        for path in claims:
            with pytest.raises(CheckpointError):
                read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


# --- ShardedTensorIndex ------------------------------------------------------------------------------------------


@pytest.fixture
def sharded_dir(tmp_path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shards = {
        SHARD_1: {
            "model.embed_tokens.weight": random_tensor(torch.bfloat16, (8, 4), 1),
            UP: random_tensor(torch.bfloat16, (6, 4), 2),
        },
        SHARD_2: {
            "model.layers.1.mlp.up_proj.weight": random_tensor(torch.bfloat16, (6, 4), 3),
            "model.norm.weight": random_tensor(torch.float32, (4,), 4),
            "model.scalar": random_tensor(torch.float32, (), 5),
        },
    }
    for shard_name, tensors in shards.items():
        save_file(tensors, model_dir / shard_name, metadata={"format": "pt"})
    weight_map = {name: shard_name for shard_name, tensors in shards.items() for name in tensors}
    total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    write_index(model_dir / INDEX_NAME, weight_map, {"total_size": total})
    return model_dir, shards


def edit_index(model_dir: Path, edit) -> None:
    index = json.loads((model_dir / INDEX_NAME).read_text())
    edit(index["weight_map"])
    (model_dir / INDEX_NAME).write_text(json.dumps(index))


def test_sharded_dir_indexes_and_loads_every_tensor(sharded_dir):
    model_dir, shards = sharded_dir
    index = ShardedTensorIndex.from_dir(model_dir)

    assert index.shards == [model_dir / SHARD_1, model_dir / SHARD_2]
    assert index.index_metadata == {"total_size": 8 * 4 * 2 + 6 * 4 * 2 * 2 + 4 * 4 + 4}
    assert list(index.tensors) == [n for s in index.shards for n in read_header(s)[0]]
    for shard in index.shards:
        assert [i.name for i in index.shard_tensors(shard)] == list(read_header(shard)[0])
        assert index.shard_tensors(shard.name) == index.shard_tensors(shard)
        assert index.metadata(shard.name) == {"format": "pt"}
    with LazyTensorLoader() as loader:
        for shard_name, tensors in shards.items():
            for name, tensor in tensors.items():
                assert index.tensors[name].path == model_dir / shard_name
                assert_same_bits(loader.load(index.tensors[name]), tensor)
    with pytest.raises(KeyError, match="not a shard"):
        index.shard_tensors("model-00003-of-00003.safetensors")


def test_sharded_dir_conveniences(sharded_dir):
    model_dir, shards = sharded_dir
    index = ShardedTensorIndex.from_dir(model_dir)
    assert index.is_sharded
    assert index.weight_map == json.loads((model_dir / INDEX_NAME).read_text())["weight_map"]
    everything = {name: t for tensors in shards.values() for name, t in tensors.items()}
    loaded = load_tensors(index)
    assert loaded.keys() == everything.keys()
    with LazyTensorLoader(index) as loader:
        for name, tensor in everything.items():
            assert_same_bits(loaded[name], tensor)
            assert_same_bits(loader.get(name), tensor)
        with pytest.raises(KeyError, match="no tensor 'ghost'"):
            loader.get("ghost")
    with LazyTensorLoader() as loader, pytest.raises(ValueError, match="built with an index"):
        loader.get(UP)


def test_write_index_writes_what_transformers_writes(tmp_path):
    path = tmp_path / INDEX_NAME
    write_index(path, {"b.weight": "s2.safetensors", "a.weight": "s1.safetensors"}, {"total_size": 12})
    expected = {
        "metadata": {"total_size": 12},
        "weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"},
    }
    assert path.read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    assert path.read_text().index('"a.weight"') < path.read_text().index('"b.weight"')


def test_single_file_dir_and_adapter_file(tmp_path, source):
    model_dir = tmp_path / "single"
    model_dir.mkdir()
    save_file(source[1], model_dir / "model.safetensors")
    index = ShardedTensorIndex.from_dir(model_dir)
    assert index.shards == [model_dir / "model.safetensors"]
    assert index.index_metadata is None
    assert not index.is_sharded
    assert set(index.tensors) == set(source[1])

    adapter = ShardedTensorIndex.from_file(source[0])
    assert adapter.shards == [source[0]]
    assert adapter.metadata(source[0]) == {"format": "pt"}
    assert [i.name for i in adapter.shard_tensors(source[0])] == list(read_header(source[0])[0])


def test_single_file_wins_over_an_index_like_transformers(sharded_dir):
    model_dir, _ = sharded_dir
    save_file({"only": torch.ones(1)}, model_dir / "model.safetensors")
    assert list(ShardedTensorIndex.from_dir(model_dir).tensors) == ["only"]


def test_tensor_stored_twice_is_rejected(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"w": torch.ones(1)}, tmp_path / name)
    headers = {tmp_path / n: read_header(tmp_path / n) for n in ("a.safetensors", "b.safetensors")}
    with pytest.raises(CheckpointError, match="b.safetensors: tensor 'w' is also in .*a.safetensors"):
        ShardedTensorIndex(headers)


@pytest.mark.parametrize(
    ("files", "fragments"),
    [
        ({}, ["no safetensors weights"]),
        ({"pytorch_model.bin": b"pickle"}, ["pytorch_model.bin", "pickle", "not loaded", "convert"]),
        ({"adapter_model.safetensors": b""}, ["adapter_model.safetensors", "as a file"]),
    ],
)
def test_dir_without_safetensors_weights(tmp_path, files, fragments):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        ShardedTensorIndex.from_dir(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path}: ")
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_not_a_directory(source):
    with pytest.raises(CheckpointError, match="not a directory"):
        ShardedTensorIndex.from_dir(source[0])


def test_missing_shard_is_named(sharded_dir):
    model_dir, _ = sharded_dir
    (model_dir / SHARD_2).unlink()
    with pytest.raises(CheckpointError, match=f"{INDEX_NAME}: names shards that are missing: {SHARD_2}"):
        ShardedTensorIndex.from_dir(model_dir)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda wm: wm.update({"ghost.weight": SHARD_1}), ["'ghost.weight' is listed for " + SHARD_1]),
        (lambda wm: wm.pop("model.norm.weight"), [SHARD_2 + " holds tensor 'model.norm.weight'", "not list"]),
        (
            lambda wm: wm.update({"model.norm.weight": SHARD_1}),
            ["'model.norm.weight' is listed for " + SHARD_1, "which the index puts in " + SHARD_1],
        ),
    ],
    ids=["listed_not_in_shard", "in_shard_not_listed", "in_wrong_shard"],
)
def test_index_and_shards_disagree(sharded_dir, edit, fragments):
    model_dir, _ = sharded_dir
    edit_index(model_dir, edit)
    with pytest.raises(CheckpointError, match="the index and its shards disagree") as caught:
        ShardedTensorIndex.from_dir(model_dir)
    assert INDEX_NAME in str(caught.value)
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "shard_name", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors", ""]
)
def test_shard_names_that_escape_the_directory(sharded_dir, shard_name):
    model_dir, shards = sharded_dir
    outside = model_dir.parent / "outside.safetensors"
    save_file(shards[SHARD_1], outside)  # exists, so only the name check can refuse it
    shard_name = str(outside) if shard_name == "ABSOLUTE" else shard_name
    edit_index(model_dir, lambda wm: wm.update({UP: shard_name}))
    with pytest.raises(CheckpointError, match="not a file inside the model directory") as caught:
        ShardedTensorIndex.from_dir(model_dir)
    assert INDEX_NAME in str(caught.value) and repr(shard_name) in str(caught.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        ('{"metadata": {}}', "has no weight_map"),
        ('{"weight_map": {}}', "has no weight_map"),
        ('{"weight_map": {"a": 3}}', "maps tensor 'a' to 3"),
        ('{"metadata": [], "weight_map": {"a": "x.safetensors"}}', "metadata is a JSON list"),
    ],
)
def test_invalid_index_json(sharded_dir, content, fragment):
    model_dir, _ = sharded_dir
    (model_dir / INDEX_NAME).write_text(content)
    with pytest.raises(CheckpointError, match=INDEX_NAME) as caught:
        ShardedTensorIndex.from_dir(model_dir)
    assert fragment in str(caught.value)


def test_corrupt_shard_is_named(sharded_dir):
    model_dir, _ = sharded_dir
    with open(model_dir / SHARD_2, "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) - 1)
    with pytest.raises(CheckpointError, match=f"{SHARD_2}: tensor .* past the end of the file"):
        ShardedTensorIndex.from_dir(model_dir)


# --- fuzzing: only CheckpointError ever comes out, and we agree with the library -----------------------------------

BASE_TENSORS = {
    "a": random_tensor(torch.float32, (2, 2), 1),
    "b": random_tensor(torch.bfloat16, (3,), 2),
    "c": random_tensor(torch.int8, (), 3),
    "d": random_tensor(torch.float16, (0, 3), 4),
    "e": random_tensor(torch.bool, (2,), 5),
}
BASE_FILE = safetensors.torch.save(BASE_TENSORS, metadata={"format": "pt"})
BASE_HEADER_LEN = struct.unpack("<Q", BASE_FILE[:8])[0]
# Messages for files we refuse although the library reads them; HEADER_CASES has one example of each.
STRICTER = ("duplicate key", "cannot read", "64-bit")


def check_against_library(path: Path) -> None:
    data = path.read_bytes()
    try:
        theirs = dict(safetensors.deserialize(data))
    except Exception:
        theirs = None
    try:
        infos, _ = read_header(path)
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: ")
        assert theirs is None or any(s in str(e) for s in STRICTER), f"library reads it, we refused: {e}"
        return
    assert theirs is not None, "we read a file the library refuses"
    assert set(infos) == set(theirs)
    assert sum(info.nbytes for info in infos.values()) <= len(data)
    with LazyTensorLoader() as loader:
        for name, info in infos.items():
            assert SAFETENSORS_DTYPES[theirs[name]["dtype"]] == info.dtype
            assert tuple(theirs[name]["shape"]) == info.shape
            assert as_bytes(loader.load(info)).numpy().tobytes() == bytes(theirs[name]["data"])


JSON_BYTES = list(b'{}[]",:0123456789-eE .\\u')
position = st.integers(0, 2**16)
mutation = st.one_of(
    st.tuples(st.just("set"), position, st.sampled_from(JSON_BYTES) | st.integers(0, 255)),
    st.tuples(
        st.just("insert"),
        position,
        st.binary(min_size=1, max_size=4) | st.sampled_from([b"0", b"-", b"9" * 21]),
    ),
    st.tuples(st.just("delete"), position, st.integers(1, 4)),
)
final_cut = st.one_of(
    st.none(),
    st.tuples(st.just("truncate"), position),
    st.tuples(
        st.just("length"), st.integers(0, 2**64 - 1) | st.integers(BASE_HEADER_LEN - 8, BASE_HEADER_LEN + 8)
    ),
)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, max_size=3), cut=final_cut)
def test_fuzz_mutated_library_files(tmp_path, mutations, cut):
    # Header edits keep the length prefix in step (so JSON-level changes get parsed); `cut` then breaks framing.
    header, data = bytearray(BASE_FILE[8 : 8 + BASE_HEADER_LEN]), BASE_FILE[8 + BASE_HEADER_LEN :]
    for op, at, arg in mutations:
        at %= len(header) + 1
        if op == "set" and at < len(header):
            header[at] = arg
        elif op == "insert":
            header[at:at] = arg
        elif op == "delete":
            del header[at : at + arg]
    raw = struct.pack("<Q", len(header)) + bytes(header) + data
    if cut is not None and cut[0] == "truncate":
        raw = raw[: cut[1] % (len(raw) + 1)]
    elif cut is not None:
        raw = struct.pack("<Q", cut[1]) + raw[8:]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(raw)
    check_against_library(path)


# A fixed menu of JSON values of every type: recursive strategies cost more time than they find bugs here.
JSON_SCALARS = [None, True, False, 0, 1, -1, 16, 2**64, 1.5, -0.0, float("inf"), "", "F32"]
JSON_SAMPLES = [*JSON_SCALARS, [], {}, [0, 16], [[0]], {"a": "b"}]
json_value = st.sampled_from(JSON_SAMPLES) | st.integers(-3, 2**65) | st.text(max_size=3)
dim = st.integers(0, 3) | st.sampled_from([-1, 2**31, 2**40, 2**63 - 1, 2**63, 2**64 - 1, 2**64])
offset = st.integers(0, 40) | st.sampled_from([-1, 2**40, 2**64 - 1, 2**64])
dtype_code = st.sampled_from([*SAFETENSORS_DTYPES, "F4", "F8_E8M0", "f32", ""])
random_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": dtype_code | json_value,
        "shape": st.lists(dim, max_size=4) | json_value,
        "data_offsets": st.lists(offset, min_size=2, max_size=2) | st.lists(offset, max_size=3) | json_value,
        "extra": json_value,
    },
)


@st.composite
def consistent_header(draw: st.DrawFn) -> tuple[dict[str, object], int]:
    """Tensors that exactly tile the data region, in random JSON order; often valid, sometimes off by a byte."""
    specs = st.tuples(st.sampled_from(list(SAFETENSORS_DTYPES)), st.lists(st.integers(0, 3), max_size=3))
    tensors, end = {}, 0
    for i, (code, shape) in enumerate(draw(st.lists(specs, max_size=4))):
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[code].itemsize
        tensors[f"t{i}"] = {"dtype": code, "shape": shape, "data_offsets": [end, end + nbytes]}
        end += nbytes
    header: dict[str, object] = {}
    if draw(st.booleans()):
        metadata = st.dictionaries(st.text(max_size=3), st.text(max_size=3) | json_value, max_size=2)
        header["__metadata__"] = draw(metadata)
    header |= {name: tensors[name] for name in draw(st.permutations(list(tensors)))}
    return header, end + draw(st.sampled_from([0, 0, 0, 1, -1]))


random_header = st.tuples(
    st.dictionaries(
        st.sampled_from(["a", "b", "__metadata__"]) | st.text(max_size=3),
        random_entry | json_value,
        max_size=4,
    ),
    st.integers(0, 48),
)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=consistent_header() | random_header | json_value.map(lambda v: (v, 0)))
def test_fuzz_random_headers(tmp_path, case):
    header, data_len = case
    path = write_raw(tmp_path / "fuzz.safetensors", header, bytes(range(256))[: max(data_len, 0)])
    check_against_library(path)


def _mixed_write(path: Path, direct: bool) -> dict[str, torch.Tensor]:
    """Tensors of awkward sizes around the direct-write chunk, written one by one."""
    chunk = safetensors_writer.DIRECT_CHUNK_BYTES
    tensors = {
        "odd": random_tensor(torch.bfloat16, (3, 5), 1),
        "chunk_plus": random_tensor(torch.uint8, (chunk + 7,), 2),
        "two_chunks": random_tensor(torch.float32, (chunk // 2 + 3,), 3),
        "scalar": random_tensor(torch.float64, (), 4),
    }
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsWriter(path, entries, {"format": "pt"}, direct=direct) as w:
        for name, tensor in tensors.items():
            w.write(name, tensor)
    return tensors


@pytest.mark.parametrize("direct", [True, False])
def test_direct_and_buffered_writes_give_the_library_bytes(tmp_path, direct):
    tensors = _mixed_write(tmp_path / "ours.safetensors", direct)
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    loaded = load_file(tmp_path / "ours.safetensors")
    assert all(
        torch.equal(loaded[n].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        for n, t in tensors.items()
    )


def test_direct_write_falls_back_when_the_filesystem_refuses(tmp_path, monkeypatch):
    """O_DIRECT refused at open (tmpfs) or only at the first write: same bytes, through the page cache."""
    expected = _mixed_write(tmp_path / "reference.safetensors", direct=False)
    real_open, real_write = os.open, os.write

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    _mixed_write(tmp_path / "a.safetensors", direct=True)
    monkeypatch.setattr(os, "open", real_open)
    refused = []

    def refusing_write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing_write)
    _mixed_write(tmp_path / "b.safetensors", direct=True)
    reference = (tmp_path / "reference.safetensors").read_bytes()
    assert (tmp_path / "a.safetensors").read_bytes() == reference == (tmp_path / "b.safetensors").read_bytes()
    assert refused or not hasattr(os, "O_DIRECT")
    assert load_file(tmp_path / "b.safetensors").keys() == expected.keys()
