"""Hostile inputs, second round: every one ends in one bounded `error:` line and exit 2 (or, for a gate, exit 1),
no traceback, nothing under the output name, and the inputs untouched."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import adapter_dir, assert_clean_failure, base_dir, cli_merge, digest, run_cli
from vera_export import CheckpointError, OnnxOptions, export_onnx, merge_into
from vera_export.errors import MAX_LINE


def _refused(result, tmp_path: Path, before: str, inputs: tuple[Path, ...], *fragments: str) -> str:
    """`assert_clean_failure`, and the error line bounded; returns the line."""
    assert_clean_failure(result, tmp_path, before, inputs, *fragments)
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(line) <= MAX_LINE + 100, len(line)
    return line


def _config(directory: Path, text: str) -> None:
    (directory / "config.json").write_text(text)


# --- a hostile base config.json ----------------------------------------------------------------------------------

BAD_CONFIGS = {
    "a JSON list": ("[1, 2, 3]", "is a JSON list, expected an object"),
    "not JSON": ("{architectures: nope", "not a readable JSON file"),
    "architectures of numbers": (json.dumps({"architectures": [123]}), "'architectures'"),
    "a size in words": (
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": "sixty-four"}),
        "'hidden_size'",
    ),
    "deep nesting": ('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}", "not a readable JSON file"),
    "an unknown class": (json.dumps({"architectures": ["NoSuchModel"], "model_type": "llama"}), None),
}


UNREADABLE = [case for case, (_, fragment) in BAD_CONFIGS.items() if fragment is not None]


@pytest.mark.parametrize("case", UNREADABLE, ids=UNREADABLE)
def test_merge_refuses_a_base_whose_config_transformers_cannot_read(work, case: str) -> None:
    tmp_path, base, adapter = work
    text, fragment = BAD_CONFIGS[case]
    _config(base, text)
    before = digest(base, adapter)
    _refused(cli_merge(tmp_path, base, adapter), tmp_path, before, (base, adapter), "config.json", fragment)


def test_an_architecture_transformers_does_not_know_still_merges(work) -> None:
    """The merge needs the weights, not the model class: only commands that run the model refuse it."""
    tmp_path, base, adapter = work
    _config(base, BAD_CONFIGS["an unknown class"][0])
    result = cli_merge(tmp_path, base, adapter)
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["NoSuchModel"]


@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_verify_full_model_refuses_it_too(work, case: str) -> None:
    tmp_path, base, adapter = work
    assert cli_merge(tmp_path, base, adapter, output=tmp_path / "merged").exit_code == 0
    _config(base, BAD_CONFIGS[case][0])
    before = digest(base, adapter, tmp_path / "merged")
    result = run_cli(
        "verify", "--base", base, "--adapter", adapter, "--merged", tmp_path / "merged", "--full-model"
    )
    _refused(result, tmp_path, before, (base, adapter, tmp_path / "merged"), "config.json")


def test_a_modules_to_save_adapter_on_a_base_with_a_broken_config(fixture_root, tmp_path: Path) -> None:
    """The tied-tensor check builds the model from config.json: a broken one is an error, not a traceback."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(base_dir(fixture_root, "bert-cls"), base)
    shutil.copytree(adapter_dir(fixture_root, "bert-cls"), adapter)
    _config(base, "not json at all")
    before = digest(base, adapter)
    _refused(cli_merge(tmp_path, base, adapter), tmp_path, before, (base, adapter), "config.json")


def test_onnx_refuses_a_broken_config(work) -> None:
    tmp_path, base, adapter = work
    _config(base, json.dumps({"architectures": [123]}))
    before = digest(base, adapter)
    result = run_cli("onnx", "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--quiet")
    _refused(result, tmp_path, before, (base, adapter), "config.json")


# --- overflow in ONNX, as in merge -------------------------------------------------------------------------------


def _huge_lambdas(adapter: Path) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    for key in tensors:
        if key.endswith("vera_lambda_b") or key.endswith("vera_lambda_d"):
            tensors[key] = torch.full_like(tensors[key], 3e38)
    save_file(tensors, path, metadata={"format": "pt"})


def test_an_overflowing_onnx_merge_is_refused_naming_the_tensor(work) -> None:
    tmp_path, base, adapter = work
    _huge_lambdas(adapter)
    before = digest(base, adapter)
    result = run_cli("onnx", "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--quiet")
    _refused(result, tmp_path, before, (base, adapter), "overflows", "_proj.weight")


def test_merge_into_raises_the_same_error(work) -> None:
    import transformers

    _, base, adapter = work
    _huge_lambdas(adapter)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    with pytest.raises(CheckpointError, match="overflows"):
        merge_into(model, [adapter])


# --- a hostile vera_export.json ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(fixture_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "graph"
    name = "llama-qv"
    options = OnnxOptions(mode="adapter", verify=False, progress=False)
    export_onnx(base_dir(fixture_root, name), [adapter_dir(fixture_root, name)], out, options)
    return out


def _manifest(graph: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "graph"
    shutil.copytree(graph, copy)
    raw = json.loads((copy / "vera_export.json").read_text())
    text = change(raw)
    (copy / "vera_export.json").write_text(text if isinstance(text, str) else json.dumps(raw))
    return copy


MANIFESTS = {
    "deep nesting": lambda raw: (
        '{"format": "vera-export onnx 1", "mode": ' + "[" * 60_000 + "]" * 60_000 + "}"
    ),
    "mode a number": lambda raw: raw.update(mode=5),
    "overridable a list": lambda raw: raw.update(overridable=[1, 2]),
    "projections a string": lambda raw: raw.update(projections="sha"),
    "base tensors of numbers": lambda raw: raw.update(base_tensors={"a": 1}),
    "a field too many": lambda raw: raw.update(extra=1),
    "shape of words": lambda raw: raw["overridable"][next(iter(raw["overridable"]))].update(shape="64"),
    "opset a bool": lambda raw: raw.update(opset=True),
    "sha256 not hex": lambda raw: raw["projections"].update(sha256="z" * 64),
}


@pytest.mark.parametrize("case", list(MANIFESTS), ids=list(MANIFESTS))
def test_a_hostile_manifest_is_one_error_line(
    fixture_root, exported: Path, tmp_path: Path, case: str
) -> None:
    graph = _manifest(exported, tmp_path, MANIFESTS[case])
    adapter = adapter_dir(fixture_root, "llama-qv")
    before = digest(graph, adapter)
    result = run_cli("onnx-adapter", "--model", graph, "--adapter", adapter, "--output", tmp_path / "out")
    _refused(result, tmp_path, before, (graph, adapter), "vera_export.json")
    result = run_cli(
        "verify", "--base", base_dir(fixture_root, "llama-qv"), "--adapter", adapter, "--onnx", graph
    )
    _refused(result, tmp_path, before, (graph, adapter), "vera_export.json")


# --- side files that are not regular files -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["link to /dev/zero", "fifo", "broken link"])
def test_a_side_file_that_is_not_a_file_is_refused_before_any_weight_is_written(work, kind: str) -> None:
    tmp_path, base, adapter = work
    odd = base / "tokenizer.json"
    if kind == "fifo":
        os.mkfifo(odd)
    elif kind == "broken link":
        odd.symlink_to(base / "gone.json")
    else:
        odd.symlink_to("/dev/zero")
    before = digest(base, adapter)
    started = time.monotonic()
    result = cli_merge(tmp_path, base, adapter)
    assert time.monotonic() - started < 30  # neither blocked on the FIFO nor copying /dev/zero
    _refused(result, tmp_path, before, (base, adapter), "tokenizer.json")


def test_embed_and_onnx_check_side_files_up_front_too(work, fixture_root) -> None:
    tmp_path, base, adapter = work
    os.mkfifo(base / "notes.txt")
    before = digest(base, adapter)
    result = run_cli("onnx", "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--quiet")
    _refused(result, tmp_path, before, (base, adapter), "notes.txt", "FIFO")
    noproj = tmp_path / "noproj"
    shutil.copytree(adapter_dir(fixture_root, "llama-all-noproj"), noproj)
    os.mkfifo(noproj / "README.md")
    before = digest(base, noproj)
    result = run_cli("embed-projections", "--base", base, "--adapter", noproj, "--output", tmp_path / "out")
    _refused(result, tmp_path, before, (base, noproj), "README.md", "FIFO")


# --- a pickle that runs code, with --allow-pickle ----------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vera-export-pwned",))


def test_a_code_pickle_is_one_line_without_unsafe_advice(work) -> None:
    tmp_path, base, adapter = work
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({**tensors, "payload": _Payload()}, adapter / "adapter_model.bin")
    Path("/tmp/vera-export-pwned").unlink(missing_ok=True)
    before = digest(base, adapter)
    line = _refused(
        cli_merge(tmp_path, base, adapter, "--allow-pickle"),
        tmp_path,
        before,
        (base, adapter),
        "adapter_model.bin",
    )
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line
    assert "posix.system" in line or "system" in line
    assert not Path("/tmp/vera-export-pwned").exists()


# --- regular expressions that backtrack ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [r"(x+x+)+y", r"(.*a){25}", r"^(([a-z])+.)+[A-Z]([a-z])+$"])
def test_patterns_that_hang_python_s_re_do_not_hang_the_commands(work, pattern: str) -> None:
    tmp_path, base, adapter = work
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": pattern}))
    before = digest(base, adapter)
    for args in (
        ["merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--quiet"],
        ["to-lora", "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--quiet"],
        ["inspect", adapter, "--base", base],
    ):
        started = time.monotonic()
        result = run_cli(*args)
        assert time.monotonic() - started < 30, args
        assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
    assert digest(base, adapter) == before and not (tmp_path / "out").exists()


def test_a_match_that_takes_too_long_is_refused(work, monkeypatch) -> None:
    monkeypatch.setattr("vera_export.targets.MATCH_SECONDS", 1e-9)
    tmp_path, base, adapter = work
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": r"(.*a){12}.*_proj"})
    )
    before = digest(base, adapter)
    _refused(
        cli_merge(tmp_path, base, adapter),
        tmp_path,
        before,
        (base, adapter),
        "'target_modules'",
        "backtracks",
    )


# --- verify as a gate --------------------------------------------------------------------------------------------


def _corrupt(path: Path, key: str, change) -> None:
    tensors = load_file(path)
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("flag", ["--layers-only", "--full-model"])
@pytest.mark.parametrize(
    ("tensor", "change"),
    [
        ("model.layers.0.mlp.down_proj.weight", lambda t: t.index_fill_(0, torch.tensor([5]), 0.0)),
        (
            "model.embed_tokens.weight",
            lambda t: t.index_fill_(0, torch.tensor([250]), 1.0),
        ),  # a token no input has
        ("model.norm.weight", lambda t: t.mul_(1 + 2**-20)),
    ],
    ids=["non-adapted weight", "embedding row", "norm by an ulp"],
)
def test_verify_fails_any_copied_tensor_that_is_not_the_base_s(work, flag: str, tensor: str, change) -> None:
    tmp_path, base, adapter = work
    merged = tmp_path / "merged"
    assert cli_merge(tmp_path, base, adapter, output=merged).exit_code == 0
    _corrupt(merged / "model.safetensors", tensor, change)
    result = run_cli("verify", "--base", base, "--adapter", adapter, "--merged", merged, flag, "--quiet")
    assert result.exit_code == 1, result.output
    assert "copied tensors equal the base's" in result.stdout and tensor in result.stdout


# --- messages ------------------------------------------------------------------------------------------------------


def test_a_huge_config_value_gives_a_bounded_line(work) -> None:
    tmp_path, base, adapter = work
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": "x" * 50_000_000}))
    before = digest(base, adapter)
    line = _refused(cli_merge(tmp_path, base, adapter), tmp_path, before, (base, adapter), "'r'")
    assert len(line) < 1000


def test_a_path_with_a_newline_stays_on_one_line(work) -> None:
    tmp_path, base, adapter = work
    odd = tmp_path / "line\nbreak"
    shutil.copytree(adapter, odd)
    (odd / "adapter_config.json").write_text("{broken")
    before = digest(base, odd)
    line = _refused(cli_merge(tmp_path, base, odd), tmp_path, before, (base, odd), "line\\nbreak")
    assert "\n" not in line


def test_a_shard_linked_to_another_file_shows_none_of_its_content(work, tmp_path: Path) -> None:
    tmp_path, base, adapter = work
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOPSECRETPASSWORD=hunter2 " * 10)
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").symlink_to(secret)
    before = digest(base, adapter)
    line = _refused(
        cli_merge(tmp_path, base, adapter), tmp_path, before, (base, adapter), "model.safetensors"
    )
    number = int.from_bytes(secret.read_bytes()[:8], "little")
    assert "hunter2" not in line and "TOPSECRET" not in line and str(number) not in line


# --- a base that already holds NaN or Inf -------------------------------------------------------------------------


def test_nan_and_inf_in_the_base_are_kept_named_and_verified_position_by_position(work) -> None:
    tmp_path, base, adapter = work
    weight = "model.layers.1.self_attn.q_proj.weight"
    _corrupt(
        base / "model.safetensors",
        weight,
        lambda t: t.index_put_(
            (torch.tensor([3, 4]), torch.tensor([7, 9])), torch.tensor([float("nan"), float("inf")])
        ),
    )
    merged = tmp_path / "merged"
    result = cli_merge(tmp_path, base, adapter, "--verify", output=merged)
    assert result.exit_code == 0, result.output
    assert "NaN or Inf" in result.stderr and weight in result.stderr
    out = load_file(merged / "model.safetensors")[weight]
    assert out[3, 7].isnan() and out[4, 9] == float("inf")
    # A NaN moved elsewhere is caught.
    _corrupt(
        merged / "model.safetensors",
        weight,
        lambda t: t.index_put_(
            (torch.tensor([3, 5]), torch.tensor([7, 7])), torch.tensor([0.0, float("nan")])
        ),
    )
    result = run_cli("verify", "--base", base, "--adapter", adapter, "--merged", merged, "--quiet")
    assert result.exit_code == 1 and "NOT the same" in result.stdout, result.output


# --- devices the machine does not have -----------------------------------------------------------------------


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", "tpu"])
def test_a_device_that_is_no_device_is_a_usage_error(work, device: str) -> None:
    tmp_path, base, adapter = work
    result = cli_merge(tmp_path, base, adapter, "--device", device)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--device {device!r}: expected cpu, cuda or cuda:N" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_cuda_without_cuda_is_one_line_saying_to_fold_on_the_cpu(work, command: str) -> None:
    tmp_path, base, adapter = work
    before = digest(base, adapter)
    flag = "--base" if command == "merge" else "--merged"
    result = run_cli(
        command, flag, base, "--adapter", adapter, "--output", tmp_path / "out", "--device", "cuda"
    )
    _refused(result, tmp_path, before, (base, adapter), "--device cuda: torch", "--device cpu")
