"""`vera-export` end to end: exit codes, one-line errors, JSON for CI, nothing left behind on failure."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tests.helpers import adapter_dir, assert_one_error_line, base_dir, digest, run_cli
from vera_export import load_adapter
from vera_export.cli import main


def test_help_shows_examples() -> None:
    assert "Example" in run_cli("--help").output
    for command in (
        "merge",
        "unmerge",
        "inspect",
        "verify",
        "to-lora",
        "embed-projections",
        "onnx",
        "onnx-adapter",
    ):
        result = run_cli(command, "--help")
        assert (
            result.exit_code == 0 and "Example" in result.output and "vera-export " + command in result.output
        )


def test_merge_verify_json(fixture_root, tmp_path) -> None:
    base, adapter = base_dir(fixture_root, "gpt2-attn"), adapter_dir(fixture_root, "gpt2-attn")
    result = run_cli(
        "merge",
        "--base",
        base,
        "--adapter",
        adapter,
        "--output",
        tmp_path / "out",
        "--verify",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["result"]
    assert len(report["folded"]) == 6 and report["verification"]["passed"] is True
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_verify_exit_code_and_json(fixture_root, tmp_path) -> None:
    base, adapter = base_dir(fixture_root, "llama-qv"), adapter_dir(fixture_root, "llama-qv")
    result = run_cli(
        "verify", "--base", base, "--adapter", adapter, "--merged", base, "--layers-only", "--json", "--quiet"
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)["result"]
    assert report["passed"] is False and any(not c["passed"] for c in report["checks"])


def test_unmerge_reports_what_it_cannot_restore(fixture_root, tmp_path) -> None:
    base, adapter = base_dir(fixture_root, "bert-cls"), adapter_dir(fixture_root, "bert-cls")
    assert (
        run_cli(
            "merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "m", "--quiet"
        ).exit_code
        == 0
    )
    result = run_cli(
        "unmerge", "--merged", tmp_path / "m", "--adapter", adapter, "--output", tmp_path / "u", "--quiet"
    )
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "classifier.weight" in result.stderr


def test_onnx_commands_as_a_pipeline_runs_them(fixture_root, tmp_path) -> None:
    """Export with the stage bar, verify for CI, catch a changed adapter, write it as an ONNX Runtime adapter file."""
    base, adapter = base_dir(fixture_root, "gpt2-attn"), adapter_dir(fixture_root, "gpt2-attn")
    graph = tmp_path / "graph"
    result = run_cli(
        "onnx", "--base", base, "--adapter", adapter, "--output", graph, "--mode", "adapter", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["result"]
    assert (
        report["mode"] == "adapter"
        and report["verification"]["passed"] is True
        and "model.onnx" in report["files"]
    )
    assert "exporting (adapter)" in result.stderr

    result = run_cli("verify", "--base", base, "--adapter", adapter, "--onnx", graph, "--json", "--quiet")
    assert (
        result.exit_code == 0 and json.loads(result.stdout)["result"]["passed"] is True and not result.stderr
    )

    changed = tmp_path / "changed"
    shutil.copytree(adapter, changed)
    tensors = load_file(changed / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("vera_lambda_b"))
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, changed / "adapter_model.safetensors")
    result = run_cli("verify", "--base", base, "--adapter", changed, "--onnx", graph, "--json", "--quiet")
    assert result.exit_code == 1 and json.loads(result.stdout)["result"]["passed"] is False

    result = run_cli(
        "onnx-adapter",
        "--model",
        graph,
        "--adapter",
        changed,
        "--output",
        tmp_path / "c.onnx_adapter",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert (
        json.loads(result.stdout)["result"]["bytes_written"] == (tmp_path / "c.onnx_adapter").stat().st_size
    )


def test_inspect_text_and_json(fixture_root) -> None:
    adapter = adapter_dir(fixture_root, "llama-qv")
    text = run_cli("inspect", adapter)
    assert (
        text.exit_code == 0
        and "r           8" in text.output
        and "equal to what the key regenerates" in text.output
    )
    result = run_cli("inspect", adapter, "--base", base_dir(fixture_root, "llama-qv"), "--json")
    report = json.loads(result.stdout)["result"]
    assert result.exit_code == 0 and report["compatible"] is True
    assert report["projections"]["regenerated_equal"] is True and len(report["layers"]) == 4


def test_inspect_lists_every_incompatibility(fixture_root) -> None:
    result = run_cli(
        "inspect",
        adapter_dir(fixture_root, "llama-all-noproj"),
        "--base",
        base_dir(fixture_root, "gpt2-attn"),
        "--json",
    )
    report = json.loads(result.stdout)["result"]
    assert result.exit_code == 1 and report["compatible"] is False
    assert len(report["problems"]) == 14  # every targeted layer of the Llama adapter, at once


def test_existing_output_needs_force(fixture_root, tmp_path) -> None:
    base, adapter = base_dir(fixture_root, "llama-qv"), adapter_dir(fixture_root, "llama-qv")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    assert_one_error_line(
        run_cli("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "o", "--quiet"),
        "--force",
    )
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    assert (
        run_cli(
            "merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "o", "--quiet", "--force"
        ).exit_code
        == 0
    )
    assert not (tmp_path / "o" / "keep.txt").exists() and (tmp_path / "o" / "model.safetensors").is_file()


def test_console_script_runs(fixture_root, tmp_path) -> None:
    """The installed entry point, in a real process: an error is one line without traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "vera_export", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().count("\n") == 0
        and "missing" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_to_lora_and_embed_projections(fixture_root, tmp_path) -> None:
    name = "gpt2-attn"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    result = run_cli(
        "to-lora",
        "--base",
        base,
        "--adapter",
        adapter,
        "--output",
        tmp_path / "lora",
        "--rank",
        "4",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["result"]
    assert report["rank"] == 4 and not report["exact"] and 0 < report["total_truncation_error"] < 1
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert "warning:" in result.stderr  # vLLM refuses trained biases
    assert "truncating layers to rank 4" in result.stderr  # the progress bar's label
    quiet = run_cli(
        "to-lora", "--base", base, "--adapter", adapter, "--output", tmp_path / "quiet", "--quiet", "--json"
    )
    assert quiet.exit_code == 0 and "layers" not in quiet.stderr
    result = run_cli(
        "embed-projections", "--base", base, "--adapter", adapter, "--output", tmp_path / "embedded"
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "embedded" / "adapter_config.json").read_text())["save_projection"] is True
    assert_one_error_line(
        run_cli(
            "embed-projections",
            "--base",
            base,
            "--adapter",
            tmp_path / "embedded",
            "--output",
            tmp_path / "again",
        ),
        "already stores",
    )


def test_debug_shows_the_traceback(tmp_path) -> None:
    result = CliRunner().invoke(main, ["--debug", "inspect", str(tmp_path / "missing")])
    assert result.exit_code != 0 and result.exc_info is not None
    assert type(result.exception).__name__ == "AdapterError"


def test_an_adapter_of_lm_head_merges_exports_and_converts(fixture_root, tmp_path) -> None:
    """PEFT saves an adapted lm_head's base weight beside its lambdas (lm_head.base_layer.weight): the frozen copy,
    checked against the base, not a trained replacement. Merged and verified, exported to ONNX (verified there),
    and converted to LoRA as for any other layer."""
    base, adapter = base_dir(fixture_root, "llama-lmhead"), adapter_dir(fixture_root, "llama-lmhead")
    assert "lm_head.weight" in load_adapter(adapter).base_copies and not load_adapter(adapter).replacements
    merged = run_cli(
        "merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "m", "--verify", "--quiet"
    )
    assert merged.exit_code == 0, merged.output
    exported = run_cli("onnx", "--base", base, "--adapter", adapter, "--output", tmp_path / "o", "--quiet")
    assert exported.exit_code == 0, exported.output
    lora = run_cli("to-lora", "--base", base, "--adapter", adapter, "--output", tmp_path / "l", "--quiet")
    assert lora.exit_code == 0, lora.output
    assert "lm_head" in json.loads((tmp_path / "l" / "adapter_config.json").read_text())["target_modules"]


def test_an_lm_head_copy_that_is_not_the_base_is_refused(fixture_root, tmp_path) -> None:
    base, adapter = base_dir(fixture_root, "llama-lmhead"), tmp_path / "adapter"
    shutil.copytree(adapter_dir(fixture_root, "llama-lmhead"), adapter)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.lm_head.base_layer.weight"
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, path, metadata={"format": "pt"})
    before = digest(base, adapter)
    for command in ("merge", "to-lora", "onnx"):
        result = run_cli(
            command, "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--quiet"
        )
        assert_one_error_line(result, "lm_head.weight", "trained on another base model")
        assert not (tmp_path / "out").exists() and digest(base, adapter) == before
