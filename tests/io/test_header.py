"""Safetensors headers are validated by the `safetensors` library's own rules (fuzzed against it): every
malformed one is a CheckpointError naming the file and the tensor."""

from __future__ import annotations

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
from safetensors.torch import load_file

from tests.io.helpers import UP, as_bytes, random_tensor, write_raw
from vera_export.errors import CheckpointError
from vera_export.io.header import (
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPES,
    TensorInfo,
    check_info,
    dtype_to_safetensors,
    is_uint,
    parse_json,
    read_header,
    truncated_error,
)
from vera_export.io.loader import LazyTensorLoader

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
    # The header length is the file's first 8 bytes: never printed, since a file of another kind would leak them.
    case(
        "header_past_file_end",
        {UP: ENTRY},
        "its first 8 bytes, as a header length, pass its size",
        header_len=10_000,
        **NO_TENSOR,
    ),
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


# --- the JSON rules the header shares with the index ---------------------------------------------------------


def test_parse_json_is_strict_where_the_library_is() -> None:
    assert parse_json('{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for text in ('{"a": 1, "a": 2}', '{"a": NaN}', '{"a": Infinity}', "[-Infinity]"):
        with pytest.raises(ValueError):
            parse_json(text)
    # Neither -0 nor an integer past 20 digits is a size: both parse as floats, which no size check accepts.
    parsed = parse_json("[0, -0, 12345678901234567890, 123456789012345678901]")
    assert [type(v) for v in parsed] == [int, float, int, float]


def test_only_non_negative_ints_are_sizes() -> None:
    assert all(is_uint(v) for v in (0, 7, 2**64))
    assert not any(is_uint(v) for v in (-1, True, False, 1.0, "1", None))  # `true` is not a size in JSON


def test_a_tensor_info_that_disagrees_with_its_dtype_and_shape_is_a_bug(tmp_path: Path) -> None:
    good = TensorInfo("w", torch.bfloat16, (3, 4), tmp_path / "x.safetensors", 8, 24)
    check_info(good)
    with pytest.raises(ValueError, match=r"'w': nbytes 25 does not match torch.bfloat16 \[3, 4\]"):
        check_info(TensorInfo("w", torch.bfloat16, (3, 4), good.path, 8, 25))
    message = str(truncated_error(good, 10))
    assert (
        str(good.path) in message and "'w' ends at byte 32" in message and "file ends at byte 18" in message
    )
