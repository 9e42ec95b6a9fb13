"""`staged_output`: an output directory or file appears whole or not at all, never over an input, and replaces an
existing one only when asked and only once complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import cli_merge, digest
from vera_export.errors import OutputError, VeraExportWarning
from vera_export.io import outputs
from vera_export.io.outputs import check_outside_inputs, staged_output


def _hidden(parent: Path) -> list[str]:
    """Staging and set-aside directories left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- a single file ---------------------------------------------------------------------------------------------


def test_a_file_appears_only_once_complete(tmp_path: Path) -> None:
    output = tmp_path / "new" / "a.onnx_adapter"  # the parent is created too
    with staged_output(output, [], file=True) as staged:
        assert staged.name == output.name and staged.parent.parent == output.parent
        assert staged.parent.name.startswith(".a.onnx_adapter.tmp-")
        staged.write_bytes(b"new")
        assert not output.exists()
    assert output.read_bytes() == b"new"
    assert _hidden(output.parent) == []


def test_an_existing_file_is_refused_without_force_and_replaced_with_it(tmp_path: Path) -> None:
    output = tmp_path / "a.onnx_adapter"
    output.write_bytes(b"old")
    with (
        pytest.raises(OutputError, match="exists; choose another file name or pass --force"),
        staged_output(output, [], file=True),
    ):
        pass
    assert output.read_bytes() == b"old"
    with staged_output(output, [], force=True, file=True) as staged:
        staged.write_bytes(b"new")
    assert output.read_bytes() == b"new" and _hidden(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_a_directory_where_the_file_goes_is_refused(tmp_path: Path, force: bool) -> None:
    output = tmp_path / "a.onnx_adapter"
    output.mkdir()
    with (
        pytest.raises(OutputError, match="is a directory; name the file to write"),
        staged_output(output, [], force=force, file=True),
    ):
        pass
    assert output.is_dir() and not any(output.iterdir())


@pytest.mark.parametrize("existing", [False, True])
def test_an_error_while_writing_a_file_leaves_nothing(tmp_path: Path, existing: bool) -> None:
    output = tmp_path / "a.onnx_adapter"
    if existing:
        output.write_bytes(b"old")
    with (
        pytest.raises(RuntimeError, match="boom"),
        staged_output(output, [], force=True, file=True) as staged,
    ):
        staged.write_bytes(b"half")
        raise RuntimeError("boom")
    assert (output.read_bytes() == b"old") if existing else not output.exists()
    assert _hidden(tmp_path) == []


def test_a_file_another_process_wrote_meanwhile_is_kept(tmp_path: Path) -> None:
    output = tmp_path / "a.onnx_adapter"
    with (
        pytest.raises(OutputError, match="another process wrote this file"),
        staged_output(output, [], file=True) as staged,
    ):
        staged.write_bytes(b"ours")
        output.write_bytes(b"theirs")
    assert output.read_bytes() == b"theirs" and _hidden(tmp_path) == []


# --- a directory -----------------------------------------------------------------------------------------------


def test_a_directory_appears_only_once_complete_with_the_usual_permissions(tmp_path: Path) -> None:
    output = tmp_path / "merged"
    with staged_output(output, []) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".merged.tmp-")
        (staging / "sub").mkdir()
        (staging / "sub" / "model.safetensors").write_bytes(b"weights")
        assert not output.exists()
    assert (output / "sub" / "model.safetensors").read_bytes() == b"weights"
    assert output.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's private 0o700
    assert _hidden(tmp_path) == []


def test_an_empty_directory_is_filled_without_force(tmp_path: Path) -> None:
    (tmp_path / "merged").mkdir()
    with staged_output(tmp_path / "merged", []) as staging:
        (staging / "a").write_text("a")
    assert (tmp_path / "merged" / "a").read_text() == "a"


def test_a_non_empty_directory_or_a_file_is_refused_without_force(tmp_path: Path) -> None:
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep").write_text("mine")
    with (
        pytest.raises(OutputError, match="exists and is not empty; .* pass --force"),
        staged_output(tmp_path / "merged", []),
    ):
        pass
    (tmp_path / "file").write_text("mine")
    with (
        pytest.raises(OutputError, match="exists and is not a directory"),
        staged_output(tmp_path / "file", [], force=True),
    ):
        pass
    assert (tmp_path / "merged" / "keep").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename aside"])
def test_force_swaps_in_the_new_directory_and_removes_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:  # a platform without RENAME_EXCHANGE: the old output is moved aside, then removed
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    output = tmp_path / "merged"
    output.mkdir()
    (output / "old").write_text("old")
    with staged_output(output, [], force=True) as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in output.iterdir()) == ["new"] and _hidden(tmp_path) == []


def test_an_error_while_writing_a_directory_keeps_the_previous_output(tmp_path: Path) -> None:
    output = tmp_path / "merged"
    output.mkdir()
    (output / "old").write_text("old")
    with (
        pytest.raises(OutputError, match="writing failed .* nothing was left under this name"),
        staged_output(output, [], force=True) as staging,
    ):
        (staging / "new").write_text("half")
        raise OSError(28, "No space left on device")
    assert sorted(p.name for p in output.iterdir()) == ["old"] and _hidden(tmp_path) == []


def test_a_directory_another_process_filled_meanwhile_is_kept(tmp_path: Path) -> None:
    output = tmp_path / "merged"
    with (
        pytest.raises(OutputError, match="another process wrote this output"),
        staged_output(output, []) as staging,
    ):
        (staging / "ours").write_text("ours")
        output.mkdir()
        (output / "theirs").write_text("theirs")
    assert sorted(p.name for p in output.iterdir()) == ["theirs"] and _hidden(tmp_path) == []


def test_a_staging_directory_left_by_a_killed_run_is_named(tmp_path: Path) -> None:
    (tmp_path / ".merged.tmp-abc123").mkdir()
    with (
        pytest.warns(VeraExportWarning, match=r"\.merged\.tmp-abc123 may be left from an interrupted run"),
        staged_output(tmp_path / "merged", []) as staging,
    ):
        (staging / "a").write_text("a")
    assert (tmp_path / "merged" / "a").is_file()


def test_fsync_flushes_every_staged_file_and_directory_and_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(Path(os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))
    )
    with staged_output(tmp_path / "merged", [], fsync=True) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "b").write_text("b")
        (staging / "a").write_text("a")
    assert {"a", "b", "sub", staging.name} <= {p.name for p in synced}
    assert synced[-1] == tmp_path  # the directory entry of the rename, last


# --- outputs and inputs ----------------------------------------------------------------------------------------


def test_an_output_overlapping_an_input_or_a_symlink_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    for output in (base, base / "sub" / "merged", tmp_path):
        with pytest.raises(OutputError, match="overlaps the input"):
            check_outside_inputs(output, [base])
    check_outside_inputs(tmp_path / "merged", [base])  # a sibling is fine
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="is a symbolic link"):
        check_outside_inputs(tmp_path / "link", [base])


# --- through the command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["base itself", "inside the base", "holding the adapter"])
def test_output_overlapping_an_input_is_refused(work, where: str) -> None:
    tmp_path, base, adapter = work
    output = {"base itself": base, "inside the base": base / "merged", "holding the adapter": tmp_path}[where]
    before = digest(base, adapter)
    result = cli_merge(tmp_path, base, adapter, output=output)
    assert result.exit_code == 2 and "overlaps the input" in result.stderr
    assert digest(base, adapter) == before and not (base / "merged").exists()


def test_symlinked_outputs_and_the_real_home_of_symlinked_inputs_are_refused(work) -> None:
    """A Hugging Face cache snapshot links its files into blobs/: --force onto blobs/ would replace the base."""
    tmp_path, base, adapter = work
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    shutil.move(base, blobs)
    snapshot.mkdir(parents=True)
    for path in blobs.iterdir():
        (snapshot / path.name).symlink_to(Path("../../blobs") / path.name)
    before = digest(blobs, adapter)
    result = cli_merge(tmp_path, snapshot, adapter, "--force", output=blobs)
    assert result.exit_code == 2 and "overlaps the input" in result.stderr
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = cli_merge(tmp_path, snapshot, adapter, "--force", output=tmp_path / "link")
    assert result.exit_code == 2 and "symbolic link" in result.stderr
    assert digest(blobs, adapter) == before and not any((tmp_path / "real").iterdir())


def test_fsync_flushes_every_output_file(work, monkeypatch) -> None:
    tmp_path, base, adapter = work
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    assert cli_merge(tmp_path, base, adapter, "--fsync").exit_code == 0
    names = {Path(path).name for path in synced}
    assert {p.name for p in base.iterdir()} <= names


def test_what_an_interrupt_would_leave_is_tracked(tmp_path: Path) -> None:
    """The CLI's exit code after a signal rests on this: outputs put in place, and the work still running."""
    from vera_export.io.outputs import PLACED, after_output, reset

    reset()
    with staged_output(tmp_path / "out", [], force=False, fsync=False) as staging:
        (staging / "f").write_text("x")
        assert PLACED.outputs == []  # not in place yet
    assert PLACED.outputs == [tmp_path / "out"]
    with pytest.raises(KeyboardInterrupt), after_output("its verification"):
        raise KeyboardInterrupt
    assert PLACED.pending == "its verification"  # left for the CLI to report
    reset()
    assert (PLACED.outputs, PLACED.pending) == ([], None)
