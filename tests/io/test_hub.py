"""Hub IDs and the Hugging Face cache (`io/hub`, through `locate`): `org/name[@revision]` and `models--org--name`
folders resolve to local snapshots, offline, from a cache laid out exactly as huggingface_hub lays it out (blobs,
snapshots, refs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import adapter_dir, assert_one_error_line, base_dir, cli_merge, digest, hub_cache, run_cli
from vera_export.errors import AdapterError, CheckpointError
from vera_export.io.hub import is_hub_id
from vera_export.io.locations import Kind, locate

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path: Path, fixture_root: Path, monkeypatch) -> Path:
    """A Hub cache holding llama-qv's base as `acme/llama` and its adapter as `acme/llama-vera`, offline."""
    cache = tmp_path / "hub"
    hub_cache(cache, "acme/llama", base_dir(fixture_root, "llama-qv"), COMMIT)
    hub_cache(cache, "acme/llama-vera", adapter_dir(fixture_root, "llama-qv"), COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # `acme/llama` must not exist as a relative path
    return cache


@pytest.mark.parametrize(
    ("text", "hub"),
    [
        ("acme/llama", True),
        ("acme/llama@main", True),
        (f"acme/llama@{COMMIT}", True),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", True),
        ("./acme/llama", False),
        ("acme/llama/extra", False),
        ("/abs/path", False),
        ("llama", False),
        ("../x", False),
        ("acme/..", False),
    ],
)
def test_what_reads_as_a_hub_id(text: str, hub: bool) -> None:
    assert is_hub_id(text) is hub


def test_merge_from_hub_ids_equals_the_merge_from_directories(cache, fixture_root, tmp_path) -> None:
    base, adapter = base_dir(fixture_root, "llama-qv"), adapter_dir(fixture_root, "llama-qv")
    assert cli_merge(tmp_path, base, adapter, output=tmp_path / "local").exit_code == 0
    result = run_cli(
        "merge", "--base", "acme/llama", "--adapter", f"acme/llama-vera@{COMMIT}", "--output", "from-hub"
    )
    assert result.exit_code == 0, result.output
    hub, local = (
        load_file(tmp_path / "from-hub" / "model.safetensors"),
        load_file(tmp_path / "local" / "model.safetensors"),
    )
    assert hub.keys() == local.keys() and all(torch.equal(hub[k], local[k]) for k in hub)
    names = {p.name for p in (tmp_path / "local").iterdir()}
    assert {p.name for p in (tmp_path / "from-hub").iterdir()} == names
    for name in names - {"model.safetensors", "vera_export.json", "README.md"}:  # those two name the inputs
        assert (tmp_path / "from-hub" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_a_cache_repository_folder_stands_for_its_main_snapshot(cache) -> None:
    assert (
        locate(cache / "models--acme--llama", Kind.BASE)
        == cache / "models--acme--llama" / "snapshots" / COMMIT
    )


def test_hf_home_is_honoured(cache, tmp_path, monkeypatch) -> None:
    home = tmp_path / "home"
    shutil.move(cache, home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert locate("acme/llama", Kind.BASE) == home / "hub" / "models--acme--llama" / "snapshots" / COMMIT


@pytest.mark.parametrize(("kind", "error"), [(Kind.BASE, CheckpointError), (Kind.ADAPTER, AdapterError)])
def test_offline_and_not_cached_says_how_to_fetch_it(cache, kind, error) -> None:
    with pytest.raises(error) as caught:
        locate("acme/absent", kind)
    message = str(caught.value)
    assert message.startswith("acme/absent: no such directory, and not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in message and "hf download acme/absent" in message


def test_an_unknown_revision_offline_is_not_cached(cache) -> None:
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        locate("acme/llama@" + "f" * 40, Kind.BASE)


def test_a_cache_folder_without_refs_main_says_which_folder_to_pass(cache, fixture_root) -> None:
    repo = hub_cache(cache, "acme/orphan", base_dir(fixture_root, "llama-qv"), COMMIT, main=False)
    with pytest.raises(CheckpointError, match="without refs/main; pass one of its snapshots/<commit>"):
        locate(repo, Kind.BASE)


def test_the_cli_error_is_one_line_and_inputs_untouched(cache, tmp_path) -> None:
    before = digest(cache)
    result = run_cli("merge", "--base", "acme/absent", "--adapter", "acme/llama-vera", "--output", "out")
    assert_one_error_line(result, "acme/absent", "hf download")
    assert not (tmp_path / "out").exists() and digest(cache) == before
