"""Faults through the command line: a full disk, signals (during the work and during the swap into place), killed
and racing runs. None leaves a partial output under the requested name, nor touches the inputs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import assert_clean_failure, cli_merge, digest, restore_sigint, run_cli
from vera_export import VerifyOptions, verify
from vera_export.io.writer import SafetensorsWriter

RECORD_FILES = ["README.md", "vera_export.json"]  # what a merge writes beside the base's files


def test_a_signal_during_the_swap_waits_for_it_to_finish(work, monkeypatch, sigint_raises) -> None:
    """Ctrl-C while --force removes the previous output: the new output is complete when the run stops."""
    tmp_path, base, adapter = work
    output = tmp_path / "out"
    assert cli_merge(tmp_path, base, adapter).exit_code == 0
    (output / "previous.txt").write_text("old")
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # held until the swap is done
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr("vera_export.io.outputs.shutil.rmtree", interrupted_rmtree)
    result = cli_merge(tmp_path, base, adapter, "--force")
    # The signal is held until the new output is in place: it is complete, and the exit code says so.
    assert result.exit_code == 0 and f"SIGINT arrived after {output} was complete" in result.stderr
    assert not (output / "previous.txt").exists()
    assert sorted(p.name for p in output.iterdir()) == sorted([p.name for p in base.iterdir()] + RECORD_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_force_replaces_only_when_complete(work, monkeypatch) -> None:
    tmp_path, base, adapter = work
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    # A failing forced merge leaves the existing output exactly as it was.
    monkeypatch.setattr(SafetensorsWriter, "write", _fail_with(errno.ENOSPC))
    result = cli_merge(tmp_path, base, adapter, "--force")
    assert (
        result.exit_code == 2
        and "No space left on device" in result.stderr
        and "nothing was left" in result.stderr
    )
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    monkeypatch.undo()
    assert cli_merge(tmp_path, base, adapter, "--force").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [p.name for p in base.iterdir()] + RECORD_FILES
    )


def _fail_with(code: int):
    def write(self, name, tensor):
        raise OSError(code, os.strerror(code))

    return write


def test_disk_full_leaves_nothing(work, monkeypatch) -> None:
    tmp_path, base, adapter = work
    monkeypatch.setattr(SafetensorsWriter, "write", _fail_with(errno.ENOSPC))
    before = digest(base, adapter)
    assert_clean_failure(
        cli_merge(tmp_path, base, adapter), tmp_path, before, (base, adapter), "No space left on device"
    )


# A merge slow enough to be caught part-way: 32 float32 weights of 1024 x 1024 (128 MB), 4 shards.
@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("big")
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    names = [f"model.layers.{i}.proj.weight" for i in range(32)]
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard in range(4):
        file = f"model-{shard + 1:05d}-of-00004.safetensors"
        chunk = names[shard * 8 : (shard + 1) * 8]
        with SafetensorsWriter(
            base / file, [(n, torch.float32, (1024, 1024)) for n in chunk], {"format": "pt"}
        ) as w:
            for n in chunk:
                w.write(n, torch.randn(1024, 1024, generator=generator))
                weight_map[n] = file
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text("{}")
    tensors = {
        "base_model.vera_A": torch.rand(64, 1024, generator=generator),
        "base_model.vera_B": torch.rand(1024, 64, generator=generator),
    }
    for n in names:
        module = n.removesuffix(".weight")
        tensors[f"base_model.model.{module}.vera_lambda_b"] = torch.randn(1024, generator=generator)
        tensors[f"base_model.model.{module}.vera_lambda_d"] = torch.randn(64, generator=generator)
    save_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "VERA", "r": 64, "target_modules": ["proj"]})
    )
    return base, adapter


def _start_merge(base: Path, adapter: Path, output: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "vera_export",
        "merge",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--output",
        str(output),
        "--quiet",
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore_sigint
    )


def _wait_for_staging(output: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        shards = list(output.parent.glob(f".{output.name}.tmp-*/*.safetensors"))
        if shards and shards[0].stat().st_size > 0:
            return
        time.sleep(0.005)
    pytest.fail("the merge finished or failed before it could be interrupted")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_merge_leaves_no_output(big_pair, tmp_path, sig) -> None:
    base, adapter = big_pair
    output = tmp_path / "out"
    process = _start_merge(base, adapter, output)
    _wait_for_staging(output, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert not output.exists()
    if sig != signal.SIGKILL:  # survivable: it cleans up and says so
        assert process.returncode == 128 + sig and f"stopped by {sig.name}" in stderr
        assert not list(tmp_path.glob(".out.tmp-*"))
    else:  # not survivable: the staging directory stays, hidden, and the next run names it
        assert process.returncode == -signal.SIGKILL
        assert list(tmp_path.glob(".out.tmp-*"))
        rerun = _start_merge(base, adapter, output)
        _, stderr = rerun.communicate(timeout=120)
        assert rerun.returncode == 0 and "interrupted run" in stderr
        assert output.is_dir()


def test_racing_merges_one_wins_cleanly(big_pair, tmp_path) -> None:
    base, adapter = big_pair
    output = tmp_path / "out"
    processes = [_start_merge(base, adapter, output) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(stderr for code, stderr in results if code == 2)
    assert "another process" in loser or "exists and is not empty" in loser
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert verify(base, [adapter], output, VerifyOptions(full_model=False, progress=False)).passed


def _disk_fills_after(limit: int):
    """An `os.write` for the writer that fails with ENOSPC once `limit` bytes were written, as a full disk does."""
    written = [0]
    real = os.write

    def write(fd: int, data) -> int:
        if written[0] + len(data) > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data)
        return real(fd, data)

    return write


@pytest.mark.parametrize("force", [False, True], ids=["new output", "--force over an old one"])
def test_a_disk_that_fills_up_mid_shard_is_one_line_and_exit_2(work, monkeypatch, force: bool) -> None:
    """The failing write holds a slice of the aligned buffer in its traceback: closing must not raise over it."""
    tmp_path, base, adapter = work
    if force:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "old.txt").write_text("old")
    monkeypatch.setattr("vera_export.io.writer.os.write", _disk_fills_after(50_000))
    before = digest(base, adapter)
    result = cli_merge(tmp_path, base, adapter, *(["--force"] if force else []))
    if force:
        assert (tmp_path / "out" / "old.txt").read_text() == "old"  # the old output untouched
        shutil.rmtree(tmp_path / "out")
    assert_clean_failure(
        result, tmp_path, before, (base, adapter), "No space left on device", "free some space"
    )


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KB tmpfs, where the machine lets this process mount one (root on Linux)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_merging_onto_a_really_full_disk(small_disk: Path, fixture_root) -> None:
    """A real filesystem that fills up (the 380 KB float32 base does not fit in 256 KB)."""
    from tests.helpers import adapter_dir, base_dir, run_cli

    name = "llama-qv"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    output = small_disk / "out"
    result = run_cli("merge", "--base", base, "--adapter", adapter, "--output", output, "--quiet")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
    assert list(small_disk.iterdir()) == []


def test_an_interrupt_says_what_it_left_and_exits_accordingly(work, monkeypatch) -> None:
    """Before the output is in place: nothing left, 130. While --verify checks the complete output: it is kept,
    the verification was stopped, 130. After everything but printing: the output is kept and the run succeeded, 0."""
    from vera_export.merging import MergeReport

    tmp_path, base, adapter = work

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("vera_export.merging.rewrite_tensors", interrupt)
        before = cli_merge(tmp_path, base, adapter, output=tmp_path / "a")
    assert before.exit_code == 130 and "nothing partial was left" in before.stderr
    assert not (tmp_path / "a").exists()
    with monkeypatch.context() as m:
        m.setattr("vera_export.merging.verify", interrupt)
        verifying = cli_merge(tmp_path, base, adapter, "--verify", output=tmp_path / "b")
    assert verifying.exit_code == 130
    assert f"{tmp_path / 'b'} is complete, but its verification was stopped" in verifying.stderr
    assert (tmp_path / "b" / "model.safetensors").is_file()
    with monkeypatch.context() as m:
        m.setattr(MergeReport, "text", interrupt)
        printing = run_cli("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "c")
    assert printing.exit_code == 0 and "Traceback" not in printing.output
    assert (
        "warning: SIGINT arrived after" in printing.stderr
        and (tmp_path / "c" / "model.safetensors").is_file()
    )
