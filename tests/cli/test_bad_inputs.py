"""Bad inputs through the command line: each ends in one clear error line (exit 2), with nothing half-written,
the inputs untouched and no code run."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    adapter_dir,
    assert_clean_failure,
    assert_one_error_line,
    base_dir,
    cli_merge,
    digest,
    edit_config,
    edit_tensors,
    pickle_adapter,
    run_cli,
)

# Each case breaks the copied base or adapter and names what the error line must mention.
CASES = {
    "base missing": (lambda b, a: shutil.rmtree(b), ["base", "not a directory"]),
    "base without weights": (lambda b, a: (b / "model.safetensors").unlink(), ["no safetensors weights"]),
    "adapter without config": (lambda b, a: (a / "adapter_config.json").unlink(), ["adapter_config.json"]),
    "adapter without weights": (
        lambda b, a: (a / "adapter_model.safetensors").unlink(),
        ["adapter_model.safetensors"],
    ),
    "LoRA adapter": (lambda b, a: edit_config(a, peft_type="LORA"), ["'LORA'", "VERA"]),
    "IA3 adapter": (lambda b, a: edit_config(a, peft_type="IA3"), ["'IA3'"]),
    "config not JSON": (
        lambda b, a: (a / "adapter_config.json").write_text("{r: 8,"),
        ["not a readable JSON"],
    ),
    "config a list": (
        lambda b, a: (a / "adapter_config.json").write_text("[1, 2]"),
        ["expected a JSON object"],
    ),
    "r zero": (lambda b, a: edit_config(a, r=0), ["'r'", "positive integer"]),
    "r negative": (lambda b, a: edit_config(a, r=-8), ["'r'"]),
    "r a string": (lambda b, a: edit_config(a, r="8"), ["'r'"]),
    "r disagrees with lambdas": (
        lambda b, a: edit_config(a, r=16),
        ["vera_lambda_d has length 8 but r is 16"],
    ),
    "unknown bias": (lambda b, a: edit_config(a, bias="lora_only"), ["'bias'", "'vera_only'"]),
    "save_projection not bool": (lambda b, a: edit_config(a, save_projection="yes"), ["'save_projection'"]),
    "bad target regex": (
        lambda b, a: edit_config(a, target_modules="(q_proj"),
        ["'target_modules'", "regular expression"],
    ),
    "target_modules wrong type": (lambda b, a: edit_config(a, target_modules=5), ["'target_modules'"]),
    "layers_to_transform wrong type": (
        lambda b, a: edit_config(a, layers_to_transform="1"),
        ["'layers_to_transform'"],
    ),
    "projections missing": (
        lambda b, a: edit_tensors(
            a / "adapter_model.safetensors",
            lambda t: (t.pop("base_model.vera_A"), t.pop("base_model.vera_B")),
        ),
        ["save_projection is true but base_model.vera_A"],
    ),
    "projections too small": (
        lambda b, a: edit_tensors(
            a / "adapter_model.safetensors",
            lambda t: t.update({"base_model.vera_A": t["base_model.vera_A"][:, :10].clone()}),
        ),
        ["too small"],
    ),
    "lambda_b wrong length": (
        lambda b, a: edit_tensors(
            a / "adapter_model.safetensors",
            lambda t: t.update(
                {"base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b": torch.ones(7)}
            ),
        ),
        ["model.layers.0.self_attn.q_proj.vera_lambda_b has length 7"],
    ),
    "NaN lambda": (
        lambda b, a: edit_tensors(
            a / "adapter_model.safetensors",
            lambda t: t["base_model.model.model.layers.1.self_attn.v_proj.vera_lambda_d"].__setitem__(
                0, float("nan")
            ),
        ),
        ["model.layers.1.self_attn.v_proj.lambda_d contains NaN or Inf"],
    ),
    "Inf projection": (
        lambda b, a: edit_tensors(
            a / "adapter_model.safetensors",
            lambda t: t["base_model.vera_B"].__setitem__((3, 1), float("inf")),
        ),
        ["vera_B contains NaN or Inf"],
    ),
    "module missing from base": (
        lambda b, a: edit_tensors(
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
    "pickle adapter": (lambda b, a: pickle_adapter(a), ["adapter_model.bin", "pickle", "--allow-pickle"]),
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


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(work, case: str) -> None:
    tmp_path, base, adapter = work
    breaks, fragments = CASES[case]
    breaks(base, adapter)
    inputs = tuple(p for p in (base, adapter) if p.exists())
    before = digest(*inputs)
    assert_clean_failure(cli_merge(tmp_path, base, adapter), tmp_path, before, inputs, *fragments)


def test_index_naming_a_missing_shard_or_tensor(fixture_root, tmp_path) -> None:
    base = tmp_path / "base"
    shutil.copytree(base_dir(fixture_root, "llama-bf16-all"), base)
    adapter = adapter_dir(fixture_root, "llama-bf16-all")
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    before = digest(base)
    assert_clean_failure(cli_merge(tmp_path, base, adapter), tmp_path, before, (base,), "model.extra.weight")
    index["weight_map"]["model.extra.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    before = digest(base)
    assert_clean_failure(
        cli_merge(tmp_path, base, adapter), tmp_path, before, (base,), "model-00009-of-00009.safetensors"
    )


def test_stored_projections_with_save_projection_false_warn_and_merge(work) -> None:
    tmp_path, base, adapter = work
    edit_config(adapter, save_projection=False)
    result = cli_merge(tmp_path, base, adapter)
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "using the stored projections" in result.stderr


def test_a_flag_that_contradicts_the_stored_layouts_is_refused(fixture_root, tmp_path) -> None:
    """GPT-2's c_attn is stored [in, out]; with fan_in_fan_out false, its square c_proj would fold transposed."""
    name = "gpt2-attn"
    base, adapter = base_dir(fixture_root, name), tmp_path / "adapter"
    shutil.copytree(adapter_dir(fixture_root, name), adapter)
    edit_config(adapter, fan_in_fan_out=False)
    before = digest(base, adapter)
    result = cli_merge(tmp_path, base, adapter)
    assert_clean_failure(
        result, tmp_path, before, (base, adapter), "stored [in, out]", "attn.c_proj", "square"
    )


def test_overflowing_merge_is_refused(fixture_root, tmp_path) -> None:
    """Lambdas so large that the fp16 sum overflows: refused, naming the tensor, instead of writing Inf."""
    name = "llama-fp16-qv"
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir(fixture_root, name), adapter)
    key = "base_model.model.model.layers.0.mlp.down_proj.vera_lambda_b"
    edit_tensors(adapter / "adapter_model.safetensors", lambda t: t.update({key: t[key] * 1e9}))
    base = base_dir(fixture_root, name)
    before = digest(base, adapter)
    result = cli_merge(tmp_path, base, adapter)
    assert_clean_failure(
        result, tmp_path, before, (base, adapter), "model.layers.0.mlp.down_proj.weight", "overflows"
    )


@pytest.mark.parametrize(
    "make_args, fragments",
    [
        (
            lambda root, tmp: [
                "merge",
                "--base",
                tmp / "nope",
                "--adapter",
                adapter_dir(root, "llama-qv"),
                "--output",
                tmp / "o",
            ],
            ["nope"],
        ),
        (
            lambda root, tmp: [
                "merge",
                "--base",
                base_dir(root, "llama-qv"),
                "--adapter",
                tmp / "nope",
                "--output",
                tmp / "o",
            ],
            ["nope"],
        ),
        (
            lambda root, tmp: [
                "merge",
                "--base",
                base_dir(root, "gpt2-attn"),
                "--adapter",
                adapter_dir(root, "llama-qv"),
                "--output",
                tmp / "o",
            ],
            ["does not fit", "q_proj"],
        ),
        (
            lambda root, tmp: [
                "merge",
                "--base",
                base_dir(root, "llama-qv"),
                "--adapter",
                adapter_dir(root, "llama-qv"),
                "--output",
                base_dir(root, "llama-qv") / "sub",
            ],
            ["overlaps"],
        ),
    ],
    ids=["missing base", "missing adapter", "adapter for another model", "output inside base"],
)
def test_bad_input_is_one_line_exit_2_and_no_output(fixture_root, tmp_path, make_args, fragments) -> None:
    args = make_args(fixture_root, tmp_path)
    assert_one_error_line(run_cli(*args), *fragments)
    assert not (tmp_path / "o").exists()
    assert not any(p.name.startswith(".o.") for p in tmp_path.iterdir())


def test_lora_adapter_is_refused(fixture_root, tmp_path) -> None:
    lora = tmp_path / "lora"
    shutil.copytree(adapter_dir(fixture_root, "llama-qv"), lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    result = run_cli(
        "merge", "--base", base_dir(fixture_root, "llama-qv"), "--adapter", lora, "--output", tmp_path / "o"
    )
    assert_one_error_line(result, "LORA", "VERA")


# One bad input for each of the other commands (merge's are above), each caught before anything is written.
OTHER_COMMANDS = {
    "inspect a missing adapter": (lambda r, t: ["inspect", t / "nope"], ["nope", "--adapter"]),
    "an adapter as --merged": (
        lambda r, t: [
            "unmerge",
            "--merged",
            adapter_dir(r, "llama-qv"),
            "--adapter",
            adapter_dir(r, "llama-qv"),
        ],
        ["is a PEFT adapter", "pass it to --adapter"],
    ),
    "to-lora on another model": (
        lambda r, t: ["to-lora", "--base", base_dir(r, "gpt2-attn"), "--adapter", adapter_dir(r, "llama-qv")],
        ["does not fit the base model"],
    ),
    "two adapters in adapter mode": (
        lambda r, t: [
            *("onnx", "--base", base_dir(r, "llama-qv"), "--mode", "adapter"),
            *("--adapter", adapter_dir(r, "llama-qv"), "--adapter", adapter_dir(r, "llama-qkv-b")),
        ],
        ["adapter mode exports exactly one adapter, got 2"],
    ),
    "onnx-adapter of a base": (
        lambda r, t: [
            "onnx-adapter",
            "--model",
            base_dir(r, "llama-qv"),
            "--adapter",
            adapter_dir(r, "llama-qv"),
        ],
        ["no vera_export.json"],
    ),
    "verify --onnx of no export": (
        lambda r, t: [
            "verify",
            "--base",
            base_dir(r, "llama-qv"),
            "--adapter",
            adapter_dir(r, "llama-qv"),
            "--onnx",
            t,
        ],
        ["no vera_export.json"],
    ),
}


@pytest.mark.parametrize("case", list(OTHER_COMMANDS))
def test_every_command_refuses_a_bad_input_in_one_line(fixture_root, tmp_path, case: str) -> None:
    make_args, fragments = OTHER_COMMANDS[case]
    args = make_args(fixture_root, tmp_path)
    if args[0] not in ("inspect", "verify"):  # the commands that write something
        args += ["--output", tmp_path / "o"]
    assert_one_error_line(run_cli(*args), *fragments)
    assert not (tmp_path / "o").exists() and not any(p.name.startswith(".o.") for p in tmp_path.iterdir())
