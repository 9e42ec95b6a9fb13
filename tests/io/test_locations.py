"""`locate`: every input location is checked to be the kind of directory its flag asks for, in one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from vera_export.errors import AdapterError, CheckpointError
from vera_export.io.locations import Kind, locate

FLAGS = {Kind.BASE: "--base", Kind.MERGED: "--merged", Kind.ADAPTER: "--adapter", Kind.EXPORT: "--model"}
ERRORS = {Kind.BASE: CheckpointError, Kind.MERGED: CheckpointError, Kind.ADAPTER: AdapterError}


def _adapter_dir(path: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("kind", list(Kind))
def test_a_missing_path_names_itself_and_the_flag(tmp_path: Path, kind: Kind) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ERRORS.get(kind, CheckpointError)) as caught:
        locate(missing, kind)
    message = str(caught.value)
    assert message.startswith(f"{missing}: ") and FLAGS[kind] in message


@pytest.mark.parametrize("kind", list(Kind))
def test_a_file_is_not_a_directory(tmp_path: Path, kind: Kind) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ERRORS.get(kind, CheckpointError)) as caught:
        locate(file, kind)
    message = str(caught.value)
    assert message.startswith(f"{file}: ") and FLAGS[kind] in message
    assert "is a file, not a directory" in message


@pytest.mark.parametrize("kind", [Kind.BASE, Kind.MERGED])
def test_an_adapter_passed_as_a_model_says_to_pass_it_to_adapter(tmp_path: Path, kind: Kind) -> None:
    adapter = _adapter_dir(tmp_path / "my-vera")
    with pytest.raises(CheckpointError) as caught:
        locate(adapter, kind)
    message = str(caught.value)
    assert message.startswith(f"{adapter}: is a PEFT adapter")
    assert "pass it to --adapter" in message and FLAGS[kind] in message


def test_a_model_directory_that_also_holds_an_adapter_config_is_a_model(tmp_path: Path) -> None:
    """A merged model shipped with its adapter's config still has its weights: it is a model."""
    for i, weights in enumerate(("model.safetensors", "model.safetensors.index.json")):
        model = _adapter_dir(tmp_path / f"merged-{i}")
        (model / weights).write_text("{}")
        assert locate(model, Kind.BASE) == model


@pytest.mark.parametrize("kind", list(Kind))
def test_a_directory_of_its_kind_is_returned_as_a_path(fixture_root: Path, kind: Kind) -> None:
    directory = {
        Kind.BASE: fixture_root / "bases" / "llama",
        Kind.MERGED: fixture_root / "bases" / "llama",
        Kind.ADAPTER: fixture_root / "adapters" / "llama-qv",
        Kind.EXPORT: fixture_root / "bases" / "llama",  # what an export holds is checked by its manifest
    }[kind]
    assert locate(str(directory), kind.value) == directory
    assert isinstance(locate(directory, kind), Path)


def test_an_unknown_kind_is_a_bug() -> None:
    with pytest.raises(ValueError):
        locate(".", "checkpoint")
