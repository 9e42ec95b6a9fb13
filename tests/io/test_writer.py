"""SafetensorsWriter writes the bytes the `safetensors` library writes, streaming, directly or through the
page cache, and refuses misuse before creating a file."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from tests.io.helpers import assert_same_bits, mixed_tensors, random_tensor
from vera_export.errors import CheckpointError
from vera_export.io import writer as safetensors_writer
from vera_export.io.header import SAFETENSORS_DTYPES, read_header
from vera_export.io.index import INDEX_NAME
from vera_export.io.writer import SafetensorsWriter, save_tensors, write_index

# --- round trips against the library ---------------------------------------------------------------------------


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


def test_write_index_writes_what_transformers_writes(tmp_path):
    path = tmp_path / INDEX_NAME
    write_index(path, {"b.weight": "s2.safetensors", "a.weight": "s1.safetensors"}, {"total_size": 12})
    expected = {
        "metadata": {"total_size": 12},
        "weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"},
    }
    assert path.read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    assert path.read_text().index('"a.weight"') < path.read_text().index('"b.weight"')


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


def test_save_tensors_keeps_the_given_order_and_metadata(tmp_path: Path) -> None:
    """An adapter's tensors as `embed-projections` writes them: in its order, each exactly as given."""
    tensors = {"z": random_tensor(torch.float32, (3,), 1), "a": random_tensor(torch.bfloat16, (2, 2), 2)}
    path = tmp_path / "adapter_model.safetensors"
    save_tensors(path, tensors, {"format": "pt"})
    assert list(read_header(path)[0]) == ["z", "a"]
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert_same_bits(f.get_tensor(name), tensor)
