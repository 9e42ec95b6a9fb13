"""Text-generation packages: built by ONNX Runtime GenAI's model builder, run by ONNX Runtime GenAI, against PEFT."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest
import torch

from tests.helpers import adapter_dir, base_dir, load_peft
from tests.onnx.helpers import Packages
from vera_export import (
    CheckpointError,
    IncompatibleAdapterError,
    OnnxOptions,
    export_onnx,
    onnx_adapter,
)
from vera_export.onnx import generation
from vera_export.onnx.manifest import Manifest

NEW_TOKENS = 16
# Every architecture in both modes at fp32; every precision on Llama's packed q/k/v and on Phi-3's packed modules;
# a tied head adapted (its branch on the logits output; in int4 the embedding reads the head's codes).
CASES = [
    ("llama-gen-qv", "adapter", "fp32"),
    ("llama-gen-qv", "merged", "fp32"),
    ("llama-gen-all", "adapter", "fp16"),
    ("llama-gen-all", "adapter", "int4"),
    ("llama-gen-all", "merged", "int4"),
    ("llama-gen-bf16-all", "adapter", "fp32"),
    ("llama-gen-tied-head", "adapter", "fp32"),
    ("llama-gen-tied-head", "adapter", "int4"),
    ("llama-gen-tied-head", "merged", "fp32"),
    ("qwen2-kv", "adapter", "fp32"),
    ("qwen2-kv", "merged", "fp16"),
    ("mistral-all", "adapter", "fp32"),
    ("mistral-all", "merged", "fp32"),
    ("phi3-packed", "adapter", "fp32"),
    ("phi3-packed", "adapter", "fp16"),
    ("phi3-packed", "merged", "int4"),
]


def _generate(
    model: og.Model, prompt: list[int], adapters: og.Adapters | None = None, name: str | None = None
) -> list[int]:
    params = og.GeneratorParams(model)
    length = len(prompt) + NEW_TOKENS
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return list(generator.get_sequence(0))[len(prompt) :]


@torch.no_grad()
def _peft_generate(base: Path, adapter: Path, prompt: list[int]) -> list[int]:
    """PEFT's greedy tokens, the end-of-sequence token suppressed as GenAI's min_length does."""
    model = load_peft(base, [adapter], dtype=torch.float32)
    eos = model.config.eos_token_id
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=eos,
        suppress_tokens=[eos],
    )
    return out[0, len(prompt) :].tolist()


PROMPT = [1, 17, 43, 120, 9, 77, 201]


@pytest.mark.parametrize(("adapter", "mode", "precision"), CASES, ids=["-".join(c) for c in CASES])
def test_package_is_verified_in_genai(packages: Packages, adapter: str, mode: str, precision: str) -> None:
    package = packages[adapter, mode, precision]
    report = package.report
    assert report.ok, report.text()
    files = {p.name for p in package.directory.iterdir()}
    assert {
        "model.onnx",
        "model.onnx.data",
        "genai_config.json",
        "tokenizer.json",
        "vera_export.json",
    } <= files
    names = [c.name for c in report.verification.checks]
    # Greedy decoding from two prompts, and in adapter mode again with a second adapter applied from a file.
    assert len(names) == (6 if mode == "adapter" else 4), names
    manifest = Manifest.read(package.directory)
    assert (manifest.task, manifest.mode, manifest.precision) == ("text-generation", mode, precision)
    assert bool(manifest.overridable) == (mode == "adapter")


@pytest.mark.parametrize(
    ("adapter", "mode"),
    [
        ("llama-gen-qv", "adapter"),
        ("llama-gen-qv", "merged"),
        ("llama-gen-tied-head", "adapter"),
        ("llama-gen-tied-head", "merged"),
        ("mistral-all", "adapter"),
        ("phi3-packed", "adapter"),
    ],
)
def test_greedy_tokens_equal_peft_generate(packages: Packages, adapter: str, mode: str) -> None:
    """The fp32 package's greedy tokens are PEFT's `generate` on its unmerged model, token for token."""
    package = packages[adapter, mode, "fp32"]
    ours = _generate(og.Model(str(package.directory)), PROMPT)
    assert ours == _peft_generate(package.base, package.adapter, PROMPT)


def test_two_adapter_files_swap_in_one_process(packages: Packages, siblings, tmp_path: Path) -> None:
    """Two sibling adapters written into the package's folder, applied in turns through og.Adapters, each
    generating PEFT's tokens for its own adapter; without one the graph runs as the exported adapter."""
    package = packages["llama-gen-all", "adapter", "fp32"]
    model_dir = tmp_path / "package"
    shutil.copytree(package.directory, model_dir)
    others = [siblings("llama-gen-all", seed) for seed in (301, 302)]
    files = []
    for k, other in enumerate(others):
        files.append(onnx_adapter(model_dir, other, model_dir / f"other-{k}.onnx_adapter").output)
    model = og.Model(str(model_dir))
    adapters = og.Adapters(model)
    for k, file in enumerate(files):
        adapters.load(str(file), f"other-{k}")
    expected = [_peft_generate(package.base, other, PROMPT) for other in others]
    assert expected[0] != expected[1]
    for _ in range(2):
        for k in range(2):
            assert _generate(model, PROMPT, adapters, f"other-{k}") == expected[k]
    assert _generate(model, PROMPT) == _peft_generate(package.base, package.adapter, PROMPT)


def test_adapter_files_that_do_not_fit_the_package_are_refused(
    packages: Packages, siblings, tmp_path
) -> None:
    package = packages["llama-gen-qv", "adapter", "fp32"]
    other_layers = siblings("llama-gen-qv", 303, target_modules=["q_proj", "k_proj"])
    other_key = siblings("llama-gen-qv", 304, projection_prng_key=99)
    for adapter, problem in ((other_layers, "adapted layers"), (other_key, "projections")):
        with pytest.raises(IncompatibleAdapterError, match=problem):
            onnx_adapter(package.directory, adapter, package.directory / "bad.onnx_adapter")
    assert not (package.directory / "bad.onnx_adapter").exists()


def test_text_in_text_out(packages: Packages) -> None:
    """A prompt string through GenAI's own tokenizer, as the docs show it."""
    package = packages["llama-gen-qv", "merged", "fp32"]
    model = og.Model(str(package.directory))
    tokenizer = og.Tokenizer(model)
    prompt = list(tokenizer.encode("the quick brown fox"))
    tokens = _generate(model, prompt)
    assert len(tokens) == NEW_TOKENS and isinstance(tokenizer.decode(tokens), str)


def test_refusals_before_any_work(fixture_root: Path, tmp_path: Path, monkeypatch) -> None:
    def export(adapter: str, out: str, base: Path | None = None, **options) -> None:
        export_onnx(
            base or base_dir(fixture_root, adapter),
            [adapter_dir(fixture_root, adapter)],
            tmp_path / out,
            OnnxOptions(task="text-generation", progress=False, **options),
        )

    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        export("gpt2-attn", "a")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(base_dir(fixture_root, "llama-gen-qv"), no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        export("llama-gen-qv", "b", base=no_tokenizer)
    with pytest.raises(CheckpointError, match="bank mode"):
        export("llama-gen-qv", "c", mode="bank")
    with pytest.raises(ValueError, match="int4 needs --task text-generation"):
        OnnxOptions(precision="int4")
    monkeypatch.setattr(generation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"vera-export\[genai\]"):
        export("llama-gen-qv", "d")
    assert not any(tmp_path.glob("[abcd]"))


def test_adapter_mode_refuses_trained_tensors_besides_lambdas(fixture_root, siblings, tmp_path: Path) -> None:
    biased = siblings("qwen2-kv", 305, bias="vera_only")
    options = OnnxOptions(task="text-generation", mode="adapter", progress=False)
    with pytest.raises(IncompatibleAdapterError, match="--mode merged"):
        export_onnx(base_dir(fixture_root, "qwen2-kv"), [biased], tmp_path / "out", options)
    assert not (tmp_path / "out").exists()
