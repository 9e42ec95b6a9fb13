"""LazyTensorLoader reads what the library wrote bit for bit, one tensor at a time, and names the file and
tensor when the file changed under it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.io.helpers import UP, assert_same_bits, mixed_tensors
from vera_export.errors import CheckpointError
from vera_export.io.header import SAFETENSORS_DTYPES, TensorInfo, read_header
from vera_export.io.index import INDEX_NAME, ShardedTensorIndex
from vera_export.io.loader import LazyTensorLoader, load_tensors

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
