"""ShardedTensorIndex: every shard indexed and every header validated before a tensor is read; an index and
shards that disagree are refused, naming what disagrees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.io.helpers import SHARD_1, SHARD_2, UP, assert_same_bits
from vera_export.errors import CheckpointError
from vera_export.io.header import read_header
from vera_export.io.index import INDEX_NAME, ShardedTensorIndex
from vera_export.io.loader import LazyTensorLoader


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


def test_an_alias_reads_its_tensor_s_bytes_right_after_it(sharded_dir):
    """A tied pair stored once, seen as two tensors: the alias sits after its tensor in the same shard, reads the
    same bytes, and the index's weight map lists it there; the original index is left as it was."""
    model_dir, shards = sharded_dir
    index = ShardedTensorIndex.from_dir(model_dir)
    shard = index.shards[1]
    first, *rest = [info.name for info in index.shard_tensors(shard)]
    aliased = index.with_aliases({"head.weight": first})
    assert [i.name for i in aliased.shard_tensors(shard)] == [first, "head.weight", *rest]
    assert aliased.weight_map["head.weight"] == shard.name and "head.weight" not in index.tensors
    assert [i.name for i in aliased.shard_tensors(index.shards[0])] == [
        i.name for i in index.shard_tensors(index.shards[0])
    ]
    with LazyTensorLoader() as loader:
        assert_same_bits(loader.load(aliased.tensors["head.weight"]), shards[shard.name][first])
    assert index.with_aliases({}) is index


def test_a_renamed_index_keeps_every_tensor_in_place(sharded_dir):
    model_dir, _ = sharded_dir
    index = ShardedTensorIndex.from_dir(model_dir)
    first = next(iter(index.tensors))
    renamed = index.renamed({first: "model.name"})
    assert list(renamed.tensors) == ["model.name", *list(index.tensors)[1:]]
    assert renamed.tensors["model.name"].offset == index.tensors[first].offset
    assert first in index.tensors and index.renamed({}) is index


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
        (
            {"adapter_model.safetensors": b""},
            ["adapter_model.safetensors", "pass the directory to --adapter"],
        ),
        ({"weights.safetensors": b""}, ["weights.safetensors", "rename it model.safetensors"]),
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
