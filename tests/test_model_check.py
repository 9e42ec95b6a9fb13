"""The whole-model check's pieces: how much memory there is, the fixed inputs, the reference's dtype."""

from __future__ import annotations

import os

import torch

from vera_export.model_check import INPUT_SHAPES, available_memory, model_inputs


def test_available_memory_counts_the_page_cache(tmp_path) -> None:
    """MemAvailable, not the free pages: right after reading a checkpoint most memory is page cache, and a
    model check that fits must not be skipped for it."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       24000000 kB\nMemFree:          300000 kB\nMemAvailable:   20000000 kB\n"
    )
    assert available_memory(meminfo) == 20000000 * 1024
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < available_memory(tmp_path / "absent") <= free * 2  # no meminfo: the free pages


def test_model_inputs_have_both_shapes_and_a_left_padded_row() -> None:
    batches = model_inputs(100)
    assert [tuple(b["input_ids"].shape) for b in batches] == list(INPUT_SHAPES)
    mask = batches[0]["attention_mask"]
    assert mask[0].all() and not mask[1, 0] and mask[1, -1]
    assert all(int(b["input_ids"].max()) < 100 for b in batches)
    assert torch.equal(model_inputs(100)[1]["input_ids"], batches[1]["input_ids"])  # fixed
