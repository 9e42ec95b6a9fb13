"""`side_files`: what travels with a model or adapter directory, the stale weights that must not, and files that
are not files at all, refused before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vera_export.errors import CheckpointError
from vera_export.io.side_files import STALE_WEIGHT_SUFFIXES, side_files


def _copy(source: Path, staging: Path, rewritten: list[Path], skip_weights: bool = True) -> list[str]:
    """Check, then copy, as a command does; the warnings it would print."""
    found = side_files(source, rewritten, skip_weights)
    found.copy(staging)
    return found.warnings()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A model directory: its own shard and index, side files (some nested) and weights of other formats."""
    root = tmp_path / "model"
    files = {
        "model.safetensors": "shard",
        "model.safetensors.index.json": "{}",
        "config.json": "{}",
        "tokenizer/tokenizer.json": "tokens",
        "tokenizer/deep/merges.txt": "merges",
        "README.md": "card",
        "pytorch_model.bin": "pickle",
        "onnx/model.onnx": "graph",
        "extra/model.safetensors": "unindexed",
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_side_files_are_copied_at_their_paths_and_other_weights_are_named(
    source: Path, tmp_path: Path
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    warnings = _copy(source, staging, [source / "model.safetensors"])
    assert _files(staging) == {
        "config.json": "{}",
        "tokenizer/tokenizer.json": "tokens",
        "tokenizer/deep/merges.txt": "merges",
        "README.md": "card",
    }
    (warning,) = warnings
    assert warning.startswith("not copied")
    # Exactly the other weights, sorted: the checkpoint's own shard and index are the caller's to write.
    assert warning.partition("): ")[2] == "extra/model.safetensors, onnx/model.onnx, pytorch_model.bin"


def test_rewritten_files_are_matched_by_their_real_paths(source: Path, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    rewritten = [source / "tokenizer" / ".." / "config.json", source / "model.safetensors"]
    _copy(source, staging, rewritten)
    assert "config.json" not in _files(staging) and "README.md" in _files(staging)


def test_with_skip_weights_false_every_file_but_the_rewritten_ones_is_copied(
    source: Path, tmp_path: Path
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    assert _copy(source, staging, [source / "model.safetensors"], skip_weights=False) == []
    expected = _files(source)
    del expected["model.safetensors"], expected["model.safetensors.index.json"]
    assert _files(staging) == expected


def test_nothing_to_skip_is_no_warning(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "README.md").write_text("card")
    (tmp_path / "out").mkdir()
    assert _copy(tmp_path / "adapter", tmp_path / "out", []) == []
    assert _files(tmp_path / "out") == {"README.md": "card"}


@pytest.mark.parametrize("suffix", STALE_WEIGHT_SUFFIXES)
def test_every_stale_weight_suffix_is_skipped(tmp_path: Path, suffix: str) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / f"weights{suffix}").write_text("stale")
    (tmp_path / "out").mkdir()
    (warning,) = _copy(tmp_path / "model", tmp_path / "out", [])
    assert f"weights{suffix}" in warning and not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "broken link"])
def test_a_file_that_is_not_a_file_is_refused_before_anything_is_copied(tmp_path: Path, kind: str) -> None:
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    odd = source / "tokenizer.json"
    if kind == "fifo":
        os.mkfifo(odd)
    elif kind == "link to /dev/zero":
        odd.symlink_to("/dev/zero")
    else:
        odd.symlink_to(source / "gone.json")
    with pytest.raises(
        CheckpointError, match="tokenizer.json: (is a FIFO|is a character device|cannot be read)"
    ):
        side_files(source, [])


def test_copying_takes_the_bytes_that_were_checked(tmp_path: Path) -> None:
    source, staging = tmp_path / "model", tmp_path / "out"
    source.mkdir()
    staging.mkdir()
    (source / "config.json").write_text("{}")
    found = side_files(source, [])
    (source / "config.json").write_text('{"grown": true}')  # changed between the check and the copy
    with pytest.raises(CheckpointError, match="changed size"):
        found.copy(staging)
