"""Provenance: a merged checkpoint records its base and every adapter folded in (with their files' SHA-256), in
`vera_export.json` and in each shard's metadata, carries a model card, refuses to take the same adapter twice,
and `unmerge`, `verify` and `inspect` read the record."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.helpers import adapter_dir, assert_one_error_line, base_dir, cli_merge, digest, hub_cache, run_cli
from vera_export import provenance
from vera_export.errors import CheckpointError
from vera_export.merging import merge
from vera_export.options import MergeOptions
from vera_export.provenance import FORMAT, METADATA_KEY, RECORD_NAME, file_digest, model_card, read_record
from vera_export.provenance import Record as ProvenanceRecord


@pytest.fixture
def inputs(fixture_root: Path, tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """`(tmp_path, base, adapter, other)`: llama with a README, and two different adapters for it."""
    base = tmp_path / "base"
    shutil.copytree(base_dir(fixture_root, "llama-qv"), base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# Tiny llama\n\nThe base's own words.\n")
    return (
        tmp_path,
        base,
        adapter_dir(fixture_root, "llama-qv"),
        adapter_dir(fixture_root, "llama-all-noproj"),
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(directory: Path) -> dict:
    return json.loads((directory / RECORD_NAME).read_text())


def test_merge_records_the_base_and_the_adapter_with_their_digests(inputs) -> None:
    tmp_path, base, adapter, _ = inputs
    assert cli_merge(tmp_path, base, adapter).exit_code == 0
    record = _record(tmp_path / "out")
    assert record["format"] == FORMAT and record["tool"] == "vera-export" and "1 ulp" in record["precision"]
    assert record["base"]["location"] == str(base)
    assert record["base"]["sha256"] == {
        name: _sha256(base / name) for name in ("config.json", "model.safetensors")
    }
    (entry,) = record["adapters"]
    assert entry["sha256"] == {
        name: _sha256(adapter / name) for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        in_shard = json.loads(f.metadata()[METADATA_KEY])
    assert in_shard == {**record, "base": {"location": str(base)}}  # all but the digests computed meanwhile


def test_the_model_card_has_the_hub_front_matter_and_keeps_the_base_card_below(inputs) -> None:
    tmp_path, base, adapter, _ = inputs
    assert cli_merge(tmp_path, base, adapter).exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    front, body = card.split("\n---\n", 1)
    assert "tags:\n- vera\n- peft\n- merged" in front and "library_name: transformers" in front
    assert "base_model:" not in front  # a local base has no Hub ID to name
    assert str(adapter) in body and body.rstrip().endswith("The base's own words.")
    assert "license: mit" not in card  # the base's front matter is not repeated inside ours


def test_a_hub_base_is_named_in_the_card_and_the_record(inputs, monkeypatch) -> None:
    tmp_path, base, adapter, _ = inputs
    commit = "c" * 40
    hub_cache(tmp_path / "hub", "acme/llama", base, commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    result = run_cli("merge", "--base", "acme/llama", "--adapter", adapter, "--output", "out", "--quiet")
    assert result.exit_code == 0, result.output
    record = _record(tmp_path / "out")
    assert (record["base"]["hub_id"], record["base"]["revision"]) == ("acme/llama", commit)
    # Read off the cache's blob names (large files are stored under their SHA-256), not recomputed: the same.
    assert record["base"]["sha256"]["model.safetensors"] == _sha256(base / "model.safetensors")
    assert (
        "base_model: acme/llama\nbase_model_relation: merge\n" in (tmp_path / "out" / "README.md").read_text()
    )


@pytest.mark.parametrize("keep", ["record file", "shard metadata only"])
def test_merging_the_same_adapter_again_is_refused(inputs, keep: str) -> None:
    tmp_path, base, adapter, _ = inputs
    assert cli_merge(tmp_path, base, adapter, output=tmp_path / "once").exit_code == 0
    if keep == "shard metadata only":
        (tmp_path / "once" / RECORD_NAME).unlink()
    before = digest(tmp_path / "once", adapter)
    result = cli_merge(tmp_path, tmp_path / "once", adapter, output=tmp_path / "twice")
    assert_one_error_line(result, "records this adapter as merged in already", "--ignore-record")
    assert not (tmp_path / "twice").exists() and digest(tmp_path / "once", adapter) == before
    again = cli_merge(tmp_path, tmp_path / "once", adapter, "--ignore-record", output=tmp_path / "twice")
    assert again.exit_code == 0 and len(_record(tmp_path / "twice")["adapters"]) == 2


def test_a_merge_into_a_merged_model_adds_to_its_record_and_unmerge_takes_away(inputs) -> None:
    tmp_path, base, adapter, other = inputs
    assert cli_merge(tmp_path, base, adapter, output=tmp_path / "one").exit_code == 0
    assert cli_merge(tmp_path, tmp_path / "one", other, output=tmp_path / "two").exit_code == 0
    two = _record(tmp_path / "two")
    assert two["base"] == _record(tmp_path / "one")["base"]  # still the original base
    assert [a["location"] for a in two["adapters"]] == [str(adapter), str(other)]
    result = run_cli(
        "unmerge", "--merged", tmp_path / "two", "--adapter", other, "--output", tmp_path / "back"
    )
    assert result.exit_code == 0, result.output
    assert [a["location"] for a in _record(tmp_path / "back")["adapters"]] == [str(adapter)]


def test_unmerging_an_adapter_the_record_does_not_list_is_refused(inputs) -> None:
    tmp_path, base, adapter, other = inputs
    assert cli_merge(tmp_path, base, adapter, output=tmp_path / "one").exit_code == 0
    command = ("unmerge", "--merged", tmp_path / "one", "--adapter", other, "--output", tmp_path / "back")
    assert_one_error_line(run_cli(*command), "does not record this adapter as merged in", "--ignore-record")
    assert not (tmp_path / "back").exists()
    assert run_cli(*command, "--ignore-record").exit_code == 0


def test_unmerging_a_checkpoint_without_a_record_warns_and_writes_none(inputs) -> None:
    tmp_path, base, adapter, _ = inputs
    result = run_cli("unmerge", "--merged", base, "--adapter", adapter, "--output", tmp_path / "back")
    assert result.exit_code == 0 and "carries no vera-export record" in result.stderr
    assert not (tmp_path / "back" / RECORD_NAME).exists()


def test_verify_shows_the_record_and_warns_about_an_adapter_it_does_not_list(inputs) -> None:
    tmp_path, base, adapter, other = inputs
    assert cli_merge(tmp_path, base, adapter).exit_code == 0
    result = run_cli("verify", "--base", base, "--adapter", adapter, "--merged", tmp_path / "out", "--json")
    envelope = json.loads(result.stdout)
    assert envelope["ok"] and envelope["result"]["record"] == _record(tmp_path / "out")
    assert not envelope["warnings"]
    text = run_cli("verify", "--base", base, "--adapter", adapter, "--merged", tmp_path / "out").stdout
    assert f"record: base {base}; adapters merged in: {adapter}" in text
    wrong = run_cli("verify", "--base", base, "--adapter", other, "--merged", tmp_path / "out")
    assert wrong.exit_code == 1 and "its vera-export record does not list" in wrong.stderr


def test_inspect_shows_the_record_and_that_merge_would_refuse(inputs) -> None:
    tmp_path, base, adapter, other = inputs
    assert cli_merge(tmp_path, base, adapter).exit_code == 0
    result = run_cli("inspect", adapter, "--base", tmp_path / "out")
    assert result.exit_code == 1 and "records this adapter as merged in already" in result.stdout
    assert f"record: base {base}; adapters merged in: {adapter}" in result.stdout
    assert run_cli("inspect", other, "--base", tmp_path / "out").exit_code == 0


@pytest.mark.parametrize(
    "text",
    ["{not json", json.dumps({"format": FORMAT, "base": "x", "adapters": [], "version": "1"}), "[" * 100000],
    ids=["not JSON", "base not an object", "deep nesting"],
)
def test_a_broken_record_is_one_error_line(inputs, text: str) -> None:
    tmp_path, base, adapter, _ = inputs
    (base / RECORD_NAME).write_text(text)
    before = digest(base, adapter)
    assert_one_error_line(cli_merge(tmp_path, base, adapter), RECORD_NAME, "delete it or restore it")
    assert not (tmp_path / "out").exists() and digest(base, adapter) == before


def test_an_onnx_manifest_is_not_a_merge_record(tmp_path: Path) -> None:
    (tmp_path / RECORD_NAME).write_text(json.dumps({"format": 1, "mode": "merged"}))
    assert read_record(tmp_path) is None


def test_a_digest_is_computed_unless_a_cache_blob_name_is_one(tmp_path: Path) -> None:
    repo = tmp_path / "models--acme--x"
    snapshot, blobs = repo / "snapshots" / ("c" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name in ("e" * 64, "a" * 40):  # an LFS file's SHA-256, a small file's git blob id
        (blobs / name).write_bytes(b"weights")
        (snapshot / name[:3]).symlink_to(f"../../blobs/{name}")
    (tmp_path / "elsewhere").symlink_to(blobs / ("e" * 64))  # not in a snapshot: the name is not trusted
    assert file_digest(snapshot / "eee") == "e" * 64
    computed = hashlib.sha256(b"weights").hexdigest()
    assert file_digest(snapshot / "aaa") == file_digest(tmp_path / "elsewhere") == computed


@pytest.mark.parametrize(
    "chunks, finished", [(0, 0), (1, 0), (6, 1)], ids=["starved", "a chunk", "a file and a chunk"]
)
def test_base_digests_finish_what_the_background_thread_could_not(
    tmp_path: Path, chunks, finished, monkeypatch
) -> None:
    """Behind busy processes the lowest-priority thread may hash next to nothing before the merge is done: `join`
    takes over in the caller's thread, going on with a file begun, and the digests are the files' own."""
    files = {"a.safetensors": bytes(range(256)) * 20, "b.safetensors": b"weights" * 700, "config.json": b"{}"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.setattr(provenance, "_CHUNK", 1024)  # a.safetensors is 5 chunks

    class Hurry:  # set once the background thread has hashed `chunks` chunks
        seen = 0

        def is_set(self) -> bool:
            self.seen += 1
            return self.seen >= chunks

    def starved(self) -> None:
        if chunks:
            self._hash(until=Hurry())

    monkeypatch.setattr(provenance.BaseDigests, "_run", starved)
    digests = provenance.BaseDigests(tmp_path, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    digests.thread.join()
    assert len(digests.result) == finished and (digests._begun is not None) == bool(chunks)
    assert digests.join() == {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_a_base_file_gone_while_hashing_is_one_error_naming_the_base(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(
        provenance.BaseDigests, "_run", lambda self: None
    )  # the thread got no CPU: join hashes
    digests = provenance.BaseDigests(tmp_path, [tmp_path / "model.safetensors"])
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=f"^{tmp_path}: could not be read while hashing it .*No such file"
    ):
        digests.join()


def test_a_failed_merge_stops_hashing_the_base(inputs, monkeypatch) -> None:
    """Nothing joins the digests of a merge that failed: leaving it, the merge stops the thread and closes its file."""
    tmp_path, base, adapter, _ = inputs
    seen = []
    real_exit = provenance.BaseDigests.__exit__

    def recording_exit(self, *exc_info):
        real_exit(self, *exc_info)
        seen.append((exc_info[0], self.thread.is_alive(), self._begun))

    monkeypatch.setattr(provenance.BaseDigests, "__exit__", recording_exit)
    monkeypatch.setattr("vera_export.merging.rewrite_tensors", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        merge(base, [adapter], tmp_path / "out", MergeOptions(progress=False))
    assert seen == [(ZeroDivisionError, False, None)]


def test_a_card_without_a_base_card_ends_with_the_record_line() -> None:
    card = model_card(ProvenanceRecord(base={"location": "/m"}, adapters=[], version="9"), None)
    assert card.rstrip().endswith("holds the full record, with the SHA-256 of every input file.")


def test_the_same_adapter_given_twice_is_refused_as_such(inputs) -> None:
    tmp_path, base, adapter, _ = inputs
    result = run_cli(
        "merge", "--base", base, "--adapter", adapter, "--adapter", adapter, "--output", tmp_path / "out"
    )
    assert_one_error_line(result, f"{adapter}: given twice (the same files)", "--ignore-record")
    assert not (tmp_path / "out").exists()
