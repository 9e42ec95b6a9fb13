"""Every bad input ends in one clear error line (exit 2), nothing half-written, inputs untouched, no code run."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tests.helpers import adapter_dir, base_dir, restore_sigint
from vera_export import VeraExportError, VerifyOptions, load_adapter, verify
from vera_export.cli import main
from vera_export.io.index import ShardedTensorIndex
from vera_export.io.writer import SafetensorsWriter
from vera_export.plan import build_plan

ADAPTER = "llama-qv"


def _digest(*paths: Path) -> str:
    """A hash of every file under the paths: inputs must come out of a failed run byte-identical."""
    h = hashlib.sha256()
    for root in paths:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            h.update(str(path).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def work(fixture_root, tmp_path):
    """Private copies of a base and an adapter that a test may break."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(base_dir(fixture_root, ADAPTER), base)
    shutil.copytree(adapter_dir(fixture_root, ADAPTER), adapter)
    return tmp_path, base, adapter


def _merge(tmp_path: Path, base: Path, adapter: Path, *extra: str, output: Path | None = None):
    output = output or tmp_path / "out"
    args = [
        "merge",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--output",
        str(output),
        "--quiet",
        *extra,
    ]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _assert_clean_failure(
    result, tmp_path: Path, digest_before: str, inputs: tuple[Path, ...], *fragments: str
) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(".out.")]
    assert leftovers == [], leftovers
    assert _digest(*inputs) == digest_before


def _config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _tensors(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# Each case breaks the copied base or adapter and names what the error line must mention.
CASES = {
    "base missing": (lambda b, a: shutil.rmtree(b), ["base", "not a directory"]),
    "base without weights": (lambda b, a: (b / "model.safetensors").unlink(), ["no safetensors weights"]),
    "adapter without config": (lambda b, a: (a / "adapter_config.json").unlink(), ["adapter_config.json"]),
    "adapter without weights": (
        lambda b, a: (a / "adapter_model.safetensors").unlink(),
        ["adapter_model.safetensors"],
    ),
    "LoRA adapter": (lambda b, a: _config(a, peft_type="LORA"), ["'LORA'", "VERA"]),
    "IA3 adapter": (lambda b, a: _config(a, peft_type="IA3"), ["'IA3'"]),
    "config not JSON": (
        lambda b, a: (a / "adapter_config.json").write_text("{r: 8,"),
        ["not a readable JSON"],
    ),
    "config a list": (
        lambda b, a: (a / "adapter_config.json").write_text("[1, 2]"),
        ["expected a JSON object"],
    ),
    "r zero": (lambda b, a: _config(a, r=0), ["'r'", "positive integer"]),
    "r negative": (lambda b, a: _config(a, r=-8), ["'r'"]),
    "r a string": (lambda b, a: _config(a, r="8"), ["'r'"]),
    "r disagrees with lambdas": (lambda b, a: _config(a, r=16), ["vera_lambda_d has length 8 but r is 16"]),
    "unknown bias": (lambda b, a: _config(a, bias="lora_only"), ["'bias'", "'vera_only'"]),
    "save_projection not bool": (lambda b, a: _config(a, save_projection="yes"), ["'save_projection'"]),
    "bad target regex": (
        lambda b, a: _config(a, target_modules="(q_proj"),
        ["'target_modules'", "regular expression"],
    ),
    "target_modules wrong type": (lambda b, a: _config(a, target_modules=5), ["'target_modules'"]),
    "layers_to_transform wrong type": (
        lambda b, a: _config(a, layers_to_transform="1"),
        ["'layers_to_transform'"],
    ),
    "projections missing": (
        lambda b, a: _tensors(
            a / "adapter_model.safetensors",
            lambda t: (t.pop("base_model.vera_A"), t.pop("base_model.vera_B")),
        ),
        ["save_projection is true but base_model.vera_A"],
    ),
    "projections too small": (
        lambda b, a: _tensors(
            a / "adapter_model.safetensors",
            lambda t: t.update({"base_model.vera_A": t["base_model.vera_A"][:, :10].clone()}),
        ),
        ["too small"],
    ),
    "lambda_b wrong length": (
        lambda b, a: _tensors(
            a / "adapter_model.safetensors",
            lambda t: t.update(
                {"base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b": torch.ones(7)}
            ),
        ),
        ["model.layers.0.self_attn.q_proj.vera_lambda_b has length 7"],
    ),
    "NaN lambda": (
        lambda b, a: _tensors(
            a / "adapter_model.safetensors",
            lambda t: t["base_model.model.model.layers.1.self_attn.v_proj.vera_lambda_d"].__setitem__(
                0, float("nan")
            ),
        ),
        ["model.layers.1.self_attn.v_proj.lambda_d contains NaN or Inf"],
    ),
    "Inf projection": (
        lambda b, a: _tensors(
            a / "adapter_model.safetensors",
            lambda t: t["base_model.vera_B"].__setitem__((3, 1), float("inf")),
        ),
        ["vera_B contains NaN or Inf"],
    ),
    "module missing from base": (
        lambda b, a: _tensors(
            b / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.q_proj.weight")
        ),
        ["model.layers.1.self_attn.q_proj", "another model"],
    ),
    "adapter safetensors truncated": (
        lambda b, a: _truncate(a / "adapter_model.safetensors", 100),
        ["adapter_model.safetensors", "truncated or corrupt"],
    ),
    "base safetensors truncated": (
        lambda b, a: _truncate(b / "model.safetensors", 1000),
        ["model.safetensors", "past the end"],
    ),
    "header length past the file": (lambda b, a: _header_length(b / "model.safetensors", 10**6), ["header"]),
    "header not JSON": (
        lambda b, a: _rewrite_header(b / "model.safetensors", b"{not json"),
        ["not valid JSON"],
    ),
    "enormous tensor declared": (
        lambda b, a: _rewrite_header(
            b / "model.safetensors",
            json.dumps(
                {"huge": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 2**64 - 1]}}
            ).encode(),
        ),
        ["huge"],
    ),
    "pickle adapter": (lambda b, a: _to_pickle(a), ["adapter_model.bin", "pickle", "--allow-pickle"]),
}


def _truncate(path: Path, keep_from_end: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-keep_from_end])


def _header_length(path: Path, length: int) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", length)
    path.write_bytes(bytes(data))


def _rewrite_header(path: Path, header: bytes) -> None:
    data = path.read_bytes()
    old = struct.unpack("<Q", data[:8])[0]
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + old :])


def _to_pickle(adapter: Path) -> None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(work, case: str) -> None:
    tmp_path, base, adapter = work
    breaks, fragments = CASES[case]
    breaks(base, adapter)
    inputs = tuple(p for p in (base, adapter) if p.exists())
    before = _digest(*inputs)
    _assert_clean_failure(_merge(tmp_path, base, adapter), tmp_path, before, inputs, *fragments)


def test_index_naming_a_missing_shard_or_tensor(fixture_root, tmp_path) -> None:
    base = tmp_path / "base"
    shutil.copytree(base_dir(fixture_root, "llama-bf16-all"), base)
    adapter = adapter_dir(fixture_root, "llama-bf16-all")
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    before = _digest(base)
    _assert_clean_failure(_merge(tmp_path, base, adapter), tmp_path, before, (base,), "model.extra.weight")
    index["weight_map"]["model.extra.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    before = _digest(base)
    _assert_clean_failure(
        _merge(tmp_path, base, adapter), tmp_path, before, (base,), "model-00009-of-00009.safetensors"
    )


def test_pickle_loads_only_when_allowed_and_never_runs_code(work) -> None:
    tmp_path, base, adapter = work
    _to_pickle(adapter)
    assert _merge(tmp_path, base, adapter, "--allow-pickle").exit_code == 0

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Exploit()}, adapter / "adapter_model.bin")
    before = _digest(base, adapter)
    result = _merge(tmp_path, base, adapter, "--allow-pickle", output=tmp_path / "out2")
    assert result.exit_code == 2 and "cannot be loaded safely" in result.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out2").exists()
    assert _digest(base, adapter) == before


def test_stored_projections_with_save_projection_false_warn_and_merge(work) -> None:
    tmp_path, base, adapter = work
    _config(adapter, save_projection=False)
    result = _merge(tmp_path, base, adapter)
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "using the stored projections" in result.stderr


def test_a_flag_that_contradicts_the_stored_layouts_is_refused(fixture_root, tmp_path) -> None:
    """GPT-2's c_attn is stored [in, out]; with fan_in_fan_out false, its square c_proj would fold transposed."""
    name = "gpt2-attn"
    base, adapter = base_dir(fixture_root, name), tmp_path / "adapter"
    shutil.copytree(adapter_dir(fixture_root, name), adapter)
    _config(adapter, fan_in_fan_out=False)
    before = _digest(base, adapter)
    result = _merge(tmp_path, base, adapter)
    _assert_clean_failure(
        result, tmp_path, before, (base, adapter), "stored [in, out]", "attn.c_proj", "square"
    )


def test_a_quantized_base_is_refused_before_writing(work) -> None:
    tmp_path, base, adapter = work
    tensors = load_file(base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, base / "model.safetensors", {"format": "pt"})
    before = _digest(base, adapter)
    _assert_clean_failure(
        _merge(tmp_path, base, adapter), tmp_path, before, (base, adapter), name, "torch.int8", "quantized"
    )


def test_overflowing_merge_is_refused(fixture_root, tmp_path) -> None:
    """Lambdas so large that the fp16 sum overflows: refused, naming the tensor, instead of writing Inf."""
    name = "llama-fp16-qv"
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir(fixture_root, name), adapter)
    key = "base_model.model.model.layers.0.mlp.down_proj.vera_lambda_b"
    _tensors(adapter / "adapter_model.safetensors", lambda t: t.update({key: t[key] * 1e9}))
    base = base_dir(fixture_root, name)
    before = _digest(base, adapter)
    result = _merge(tmp_path, base, adapter)
    _assert_clean_failure(
        result, tmp_path, before, (base, adapter), "model.layers.0.mlp.down_proj.weight", "overflows"
    )


@pytest.mark.parametrize("where", ["base itself", "inside the base", "holding the adapter"])
def test_output_overlapping_an_input_is_refused(work, where: str) -> None:
    tmp_path, base, adapter = work
    output = {"base itself": base, "inside the base": base / "merged", "holding the adapter": tmp_path}[where]
    before = _digest(base, adapter)
    result = _merge(tmp_path, base, adapter, output=output)
    assert result.exit_code == 2 and "overlaps the input" in result.stderr
    assert _digest(base, adapter) == before and not (base / "merged").exists()


def test_symlinked_outputs_and_the_real_home_of_symlinked_inputs_are_refused(work) -> None:
    """A Hugging Face cache snapshot links its files into blobs/: --force onto blobs/ would replace the base."""
    tmp_path, base, adapter = work
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    shutil.move(base, blobs)
    snapshot.mkdir(parents=True)
    for path in blobs.iterdir():
        (snapshot / path.name).symlink_to(Path("../../blobs") / path.name)
    before = _digest(blobs, adapter)
    result = _merge(tmp_path, snapshot, adapter, "--force", output=blobs)
    assert result.exit_code == 2 and "overlaps the input" in result.stderr
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = _merge(tmp_path, snapshot, adapter, "--force", output=tmp_path / "link")
    assert result.exit_code == 2 and "symbolic link" in result.stderr
    assert _digest(blobs, adapter) == before and not any((tmp_path / "real").iterdir())


def test_a_signal_during_the_swap_waits_for_it_to_finish(work, monkeypatch, sigint_raises) -> None:
    """Ctrl-C while --force removes the previous output: the new output is complete when the run stops."""
    tmp_path, base, adapter = work
    output = tmp_path / "out"
    assert _merge(tmp_path, base, adapter).exit_code == 0
    (output / "previous.txt").write_text("old")
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # held until the swap is done
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr("vera_export.io.outputs.shutil.rmtree", interrupted_rmtree)
    result = _merge(tmp_path, base, adapter, "--force")
    assert result.exit_code == 128 + signal.SIGINT and "nothing partial" in result.stderr
    assert not (output / "previous.txt").exists()
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in base.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_fsync_flushes_every_output_file(work, monkeypatch) -> None:
    tmp_path, base, adapter = work
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    assert _merge(tmp_path, base, adapter, "--fsync").exit_code == 0
    names = {Path(path).name for path in synced}
    assert {p.name for p in base.iterdir()} <= names


def test_force_replaces_only_when_complete(work, monkeypatch) -> None:
    tmp_path, base, adapter = work
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    # A failing forced merge leaves the existing output exactly as it was.
    monkeypatch.setattr(SafetensorsWriter, "write", _fail_with(errno.ENOSPC))
    result = _merge(tmp_path, base, adapter, "--force")
    assert (
        result.exit_code == 2
        and "No space left on device" in result.stderr
        and "nothing was left" in result.stderr
    )
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    monkeypatch.undo()
    assert _merge(tmp_path, base, adapter, "--force").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in base.iterdir())


def _fail_with(code: int):
    def write(self, name, tensor):
        raise OSError(code, os.strerror(code))

    return write


def test_disk_full_leaves_nothing(work, monkeypatch) -> None:
    tmp_path, base, adapter = work
    monkeypatch.setattr(SafetensorsWriter, "write", _fail_with(errno.ENOSPC))
    before = _digest(base, adapter)
    _assert_clean_failure(
        _merge(tmp_path, base, adapter), tmp_path, before, (base, adapter), "No space left on device"
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


_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.text(max_size=8), st.integers(-3, 40), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_PLAUSIBLE = {
    "r": st.one_of(st.sampled_from([8, 16, 0, -1]), st.integers(-5, 10**12)),
    "target_modules": st.one_of(
        st.lists(
            st.sampled_from(["q_proj", "v_proj", "k_proj", "mlp", "model.layers.0.self_attn.q_proj", ""]),
            max_size=4,
        ),
        st.sampled_from([".*q_proj", "(", ".*", "all-linear", r".*\.(q|v)_proj", "[z-a]"]),
    ),
    "projection_prng_key": st.integers(-(2**80), 2**80),
    "save_projection": st.booleans(),
    "fan_in_fan_out": st.booleans(),
    "bias": st.sampled_from(["none", "all", "vera_only", "lora_only", ""]),
    "modules_to_save": st.one_of(
        st.none(), st.lists(st.sampled_from(["lm_head", "q_proj", "(", "score"]), max_size=3)
    ),
    "layers_to_transform": st.one_of(st.none(), st.integers(-2, 3), st.lists(st.integers(-2, 3), max_size=3)),
    "layers_pattern": st.one_of(st.none(), st.sampled_from(["layers", "h", "(", ["layers", "blocks"]])),
}


@pytest.fixture(scope="module")
def fuzz_adapter(fixture_root, tmp_path_factory) -> Path:
    adapter = tmp_path_factory.mktemp("fuzz")
    shutil.copy(adapter_dir(fixture_root, ADAPTER) / "adapter_model.safetensors", adapter)
    return adapter


_OUTCOMES: dict[str, int] = {}


@pytest.mark.filterwarnings("ignore::vera_export.VeraExportWarning")
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_adapter_configs_end_in_our_errors(fixture_root, fuzz_adapter, data) -> None:
    """Any adapter_config.json either loads and plans against the base, or fails with our own error.

    Each example starts from the adapter's real config and changes, drops or garbles a few fields.
    """
    config = json.loads((adapter_dir(fixture_root, ADAPTER) / "adapter_config.json").read_text())
    for key in data.draw(
        st.lists(st.sampled_from([*sorted(_PLAUSIBLE), "peft_type"]), max_size=4, unique=True)
    ):
        choice = data.draw(st.sampled_from(["plausible", "garbage", "drop"]))
        if choice == "drop":
            config.pop(key, None)
        else:
            config[key] = data.draw(_PLAUSIBLE.get(key, st.just("LORA")) if choice == "plausible" else _ANY)
    (fuzz_adapter / "adapter_config.json").write_text(json.dumps(config))
    shapes = ShardedTensorIndex.from_dir(base_dir(fixture_root, ADAPTER)).tensors
    try:
        build_plan([load_adapter(fuzz_adapter)], shapes)
        _OUTCOMES["planned"] = _OUTCOMES.get("planned", 0) + 1
    except VeraExportError as exc:
        _OUTCOMES[type(exc).__name__] = _OUTCOMES.get(type(exc).__name__, 0) + 1


def test_fuzzing_reached_every_outcome() -> None:
    """The fuzzer above explored both valid configs and each kind of rejection (runs after it, in file order)."""
    assert {"planned", "AdapterError", "IncompatibleAdapterError"} <= _OUTCOMES.keys(), _OUTCOMES
