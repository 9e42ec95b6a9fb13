"""The whole-model check's pieces: how much memory there is, the fixed inputs, the reference's dtype."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from vera_export.model_check import (
    INPUT_SHAPES,
    ModelCheckSkipped,
    architecture_inputs,
    available_memory,
    model_inputs,
)


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


def _model(architecture: str, **config) -> torch.nn.Module:
    cls = getattr(transformers, architecture)
    return cls(cls.config_class(**config)).eval()


def test_inputs_are_the_architecture_s() -> None:
    """Decoder tokens for an encoder-decoder, log-mel features for Whisper, pixels for ViT: each in the model's
    dtype and the config's sizes, both shapes of `model_inputs`."""
    t5 = _model(
        "T5ForConditionalGeneration", d_model=32, d_ff=32, d_kv=8, num_layers=1, num_heads=4, vocab_size=50
    )
    (first, second) = architecture_inputs(t5)
    assert set(first) == {"input_ids", "attention_mask", "decoder_input_ids"}
    assert (
        first["decoder_input_ids"].shape == first["input_ids"].shape
        and int(second["decoder_input_ids"].max()) < 50
    )
    whisper = _model(
        "WhisperForConditionalGeneration",
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        vocab_size=60,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        decoder_start_token_id=1,
    ).double()
    (batch, _) = architecture_inputs(whisper)
    assert batch["input_features"].shape == (2, 8, 32) and batch["input_features"].dtype == torch.float64
    assert "decoder_input_ids" in batch
    vit = _model(
        "ViTForImageClassification",
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    assert [tuple(b["pixel_values"].shape) for b in architecture_inputs(vit)] == [
        (2, 3, 16, 16),
        (1, 3, 16, 16),
    ]


def test_an_input_kind_without_inputs_is_a_stated_skip() -> None:
    model = _model(
        "Wav2Vec2Model", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32
    )
    with pytest.raises(ModelCheckSkipped, match="Wav2Vec2Model reads input_values"):
        architecture_inputs(model)
