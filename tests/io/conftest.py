"""Safetensors files the io tests share: one small file of several dtypes, and a two-shard checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.io.helpers import SHARD_1, SHARD_2, UP, random_tensor
from vera_export.io.index import INDEX_NAME
from vera_export.io.writer import write_index


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
