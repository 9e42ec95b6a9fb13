"""`--json`: every command's output, on success, on a failed check and on an error, is the documented envelope."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from tests.helpers import adapter_dir, base_dir
from vera_export.cli import main

SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "envelope.schema.json").read_text())


def run_json(*args: object):
    """Run the CLI with --json; check the envelope against the schema and against what the process did."""
    result = CliRunner().invoke(main, [*map(str, args), "--json"], catch_exceptions=False)
    envelope = json.loads(result.stdout)  # strict JSON: no NaN, nothing else on stdout
    jsonschema.validate(envelope, SCHEMA)
    assert envelope["exit_code"] == result.exit_code and envelope["ok"] == (result.exit_code == 0)
    lines = result.stderr.splitlines()
    warnings = [line.removeprefix("warning: ") for line in lines if line.startswith("warning: ")]
    assert warnings == envelope["warnings"]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    if envelope["error"] is not None and envelope["error"]["type"] == "UsageError":
        assert f"Error: {envelope['error']['message']}" in lines  # click's usage message, then its error
    else:
        assert errors == ([envelope["error"]["message"]] if envelope["error"] else [])
    return envelope


@pytest.fixture(scope="module")
def llama(fixture_root) -> tuple[Path, Path]:
    return base_dir(fixture_root, "llama-qv"), adapter_dir(fixture_root, "llama-qv")


@pytest.fixture(scope="module")
def exported(llama, tmp_path_factory) -> Path:
    """An adapter-mode graph of the tiny Llama, exported once for the commands that read one."""
    base, adapter = llama
    out = tmp_path_factory.mktemp("json") / "graph"
    envelope = run_json(
        "onnx", "--base", base, "--adapter", adapter, "--output", out, "--mode", "adapter", "--quiet"
    )
    assert envelope["command"] == "onnx" and envelope["ok"] and envelope["result"]["verification"]["passed"]
    return out


def test_merge_unmerge_and_verify(llama, tmp_path) -> None:
    base, adapter = llama
    merged, restored = tmp_path / "merged", tmp_path / "restored"
    envelope = run_json(
        "merge", "--base", base, "--adapter", adapter, "--output", merged, "--verify", "--quiet"
    )
    assert envelope["command"] == "merge" and envelope["ok"] and envelope["exit_code"] == 0
    assert len(envelope["result"]["folded"]) == 4 and envelope["result"]["verification"]["passed"] is True
    envelope = run_json("unmerge", "--merged", merged, "--adapter", adapter, "--output", restored, "--quiet")
    assert envelope["command"] == "unmerge" and envelope["ok"] and len(envelope["result"]["folded"]) == 4
    envelope = run_json("verify", "--base", base, "--adapter", adapter, "--merged", merged, "--quiet")
    assert envelope["ok"] and envelope["result"]["passed"] is True and envelope["result"]["checks"]


def test_a_failed_check_is_exit_1_with_its_result(llama) -> None:
    base, adapter = llama
    envelope = run_json("verify", "--base", base, "--adapter", adapter, "--merged", base, "--layers-only")
    assert envelope["exit_code"] == 1 and not envelope["ok"] and envelope["error"] is None
    assert envelope["result"]["passed"] is False
    assert any(not check["passed"] for check in envelope["result"]["checks"])


def test_inspect_fits_and_misfits(fixture_root, llama) -> None:
    base, adapter = llama
    envelope = run_json("inspect", adapter, "--base", base)
    assert envelope["ok"] and envelope["result"]["compatible"] is True and envelope["result"]["r"] == 8
    envelope = run_json("inspect", adapter, "--base", base_dir(fixture_root, "gpt2-attn"))
    assert envelope["exit_code"] == 1 and envelope["result"]["compatible"] is False
    assert envelope["result"]["problems"]


def test_onnx_commands(exported, llama, tmp_path) -> None:
    base, adapter = llama
    envelope = run_json("verify", "--base", base, "--adapter", adapter, "--onnx", exported, "--quiet")
    assert envelope["command"] == "verify" and envelope["ok"]
    envelope = run_json(
        "onnx-adapter", "--model", exported, "--adapter", adapter, "--output", tmp_path / "a.onnx_adapter"
    )
    assert envelope["command"] == "onnx-adapter" and envelope["ok"]
    assert envelope["result"]["bytes_written"] == (tmp_path / "a.onnx_adapter").stat().st_size


def test_to_lora_and_embed_projections_with_warnings(fixture_root, tmp_path) -> None:
    name = "gpt2-attn"  # trained biases: vLLM would refuse them, which is a warning
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    envelope = run_json(
        "to-lora", "--base", base, "--adapter", adapter, "--output", tmp_path / "lora", "--quiet"
    )
    assert envelope["command"] == "to-lora" and envelope["ok"] and envelope["warnings"]
    assert envelope["result"]["exact"] is True and envelope["result"]["rank"] == 8
    envelope = run_json(
        "embed-projections", "--base", base, "--adapter", adapter, "--output", tmp_path / "embedded"
    )
    assert envelope["command"] == "embed-projections" and envelope["ok"]
    assert envelope["result"]["vera_A_shape"][0] == 8


@pytest.mark.parametrize(
    "args, error",
    [
        (
            ["merge", "--base", "{tmp}/nope", "--adapter", "{adapter}", "--output", "{tmp}/o"],
            "CheckpointError",
        ),
        (["unmerge", "--merged", "{base}", "--adapter", "{tmp}/nope", "--output", "{tmp}/o"], "AdapterError"),
        (
            ["verify", "--base", "{base}", "--adapter", "{adapter}", "--merged", "{tmp}/nope"],
            "CheckpointError",
        ),
        (["inspect", "{tmp}/nope"], "AdapterError"),
        (["onnx", "--base", "{base}", "--adapter", "{adapter}", "--output", "{base}/inside"], "OutputError"),
        (
            ["onnx-adapter", "--model", "{base}", "--adapter", "{adapter}", "--output", "{tmp}/a"],
            "CheckpointError",
        ),
        (["to-lora", "--base", "{base}", "--adapter", "{tmp}/nope", "--output", "{tmp}/o"], "AdapterError"),
        (
            ["embed-projections", "--base", "{base}", "--adapter", "{adapter}", "--output", "{tmp}/o"],
            "AdapterError",
        ),
        (
            ["merge", "--base", "{base}", "--adapter", "{adapter}", "--output", "{tmp}/o", "--bogus"],
            "UsageError",
        ),
        (["verify", "--base", "{base}", "--adapter", "{adapter}"], "UsageError"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else value,
)
def test_errors_are_envelopes(llama, tmp_path, args: list[str], error: str) -> None:
    base, adapter = llama
    filled = [a.format(tmp=tmp_path, base=base, adapter=adapter) for a in args]
    envelope = run_json(*filled)
    assert envelope["command"] == args[0] and envelope["exit_code"] == 2
    assert envelope["result"] is None and envelope["error"]["type"] == error
    assert not (tmp_path / "o").exists()


def test_an_unknown_command_is_an_envelope_too() -> None:
    envelope = run_json("frobnicate")
    assert envelope["command"] == "vera-export" and envelope["error"]["type"] == "UsageError"


def test_an_interrupted_run_is_exit_130(llama, tmp_path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vera_export.merging.merge", interrupted)
    base, adapter = llama
    envelope = run_json("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "o")
    assert envelope["exit_code"] == 130 and envelope["error"]["type"] == "Interrupted"
    assert "SIGINT" in envelope["error"]["message"]


def test_an_interrupt_after_the_output_was_complete_is_exit_0(llama, tmp_path, monkeypatch) -> None:
    """The signal arrives once the output is in place, while the report prints: the run did what it was asked."""

    def interrupted(self, quiet=False):
        raise KeyboardInterrupt

    monkeypatch.setattr("vera_export.merging.MergeReport.text", interrupted)
    monkeypatch.setattr("vera_export.reports.to_json", lambda report: interrupted(report))
    base, adapter = llama
    envelope = run_json("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "o")
    assert (envelope["exit_code"], envelope["ok"], envelope["error"]) == (0, True, None)
    assert (
        envelope["warnings"][-1].startswith("SIGINT arrived after") and "is kept" in envelope["warnings"][-1]
    )
    assert (tmp_path / "o" / "model.safetensors").is_file()
