"""The verification gate passes good merges (ours and PEFT's) and catches broken ones."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import adapter_dir, base_dir, load_peft
from vera_export import MergeOptions, VerifyOptions, merge, verify
from vera_export.precision import ulp
from vera_export.reports import to_json

QUIET = MergeOptions(progress=False)
FULL = VerifyOptions(full_model=True, progress=False)
LAYERS = VerifyOptions(full_model=False, progress=False)


@pytest.mark.parametrize(
    "name", ["llama-qv", "llama-bf16-all", "gpt2-attn", "bert-cls", "llama-fp16-qv", "llama-tied-lmhead"]
)
def test_verify_passes_our_merge(fixture_root, tmp_path, name: str) -> None:
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    merge(base, [adapter], tmp_path / "out", QUIET)
    report = verify(base, [adapter], tmp_path / "out", FULL)
    assert report.passed, [c.line() for c in report.checks if not c.passed]
    names = [c.name for c in report.checks]
    assert any(n.startswith("layer ") for n in names) and any(n.startswith("model ") for n in names)
    assert to_json(report)["passed"] is True


def test_verify_passes_peft_merge(fixture_root, tmp_path) -> None:
    """A checkpoint merged and saved by PEFT + transformers passes too: the gate is about correctness."""
    name = "llama-qv"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_peft(base, [adapter]).merge_and_unload().save_pretrained(tmp_path / "peft")
    assert verify(base, [adapter], tmp_path / "peft", FULL).passed


def _corrupt(path, key, change) -> None:
    tensors = load_file(path)
    tensors[key] = change(tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda w: w + 4 * ulp(w, w.dtype).to(w.dtype), id="every element 4 ulp off"),
        pytest.param(lambda w: torch.cat([w[:, :1] * 1.01, w[:, 1:]], dim=1), id="one input column 1% off"),
        pytest.param(lambda w: w.T.contiguous(), id="transposed square weight"),
        pytest.param(
            lambda w: w.index_put((torch.tensor([3]), torch.tensor([5])), torch.tensor(float("nan"))),
            id="one NaN",
        ),
        pytest.param(
            lambda w: w.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))),
            id="one Inf",
        ),
        pytest.param(lambda w: torch.full_like(w, float("nan")), id="all NaN"),
    ],
)
def test_verify_catches_a_broken_layer(fixture_root, tmp_path, change) -> None:
    name = "llama-qv"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    merge(base, [adapter], tmp_path / "out", QUIET)
    _corrupt(tmp_path / "out" / "model.safetensors", "model.layers.1.self_attn.q_proj.weight", change)
    report = verify(base, [adapter], tmp_path / "out", LAYERS)
    failed = [c.name for c in report.checks if not c.passed]
    assert failed == ["layer model.layers.1.self_attn.q_proj"]


def test_verify_catches_small_elements_set_to_zero_in_16_bit(fixture_root, tmp_path) -> None:
    """Zero has the spacing of subnormals: a merged weight whose small elements were zeroed fails (it passed while
    ulp(0) was taken as 2**-8)."""
    name, weight = "llama-bf16-all", "model.layers.0.self_attn.q_proj.weight"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    merge(base, [adapter], tmp_path / "out", QUIET)
    shard = next(p for p in (tmp_path / "out").glob("*.safetensors") if weight in load_file(p))
    _corrupt(shard, weight, lambda w: torch.where(w.abs() < 2**-9, torch.zeros_like(w), w))
    report = verify(base, [adapter], tmp_path / "out", LAYERS)
    assert [c.name for c in report.checks if not c.passed] == ["layer model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("name", ["llama-bf16-all", "llama-fp16-qv"])
def test_verify_catches_one_lambda_one_percent_off_in_16_bit(fixture_root, tmp_path, name: str) -> None:
    """Merged with one element of one lambda_b 1% off, in a row no sample would pick: every element is checked."""
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    wrong = tmp_path / "wrong-adapter"
    shutil.copytree(adapter, wrong)
    tensors = load_file(wrong / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("vera_lambda_b"))[-1]
    tensors[key][1] *= 1.01
    save_file(tensors, wrong / "adapter_model.safetensors", metadata={"format": "pt"})
    merge(base, [wrong], tmp_path / "out", QUIET)
    report = verify(base, [adapter], tmp_path / "out", FULL)
    module = key.removeprefix("base_model.model.").removesuffix(".vera_lambda_b")
    assert [c.name for c in report.checks if not c.passed] == [f"layer {module}"]


def test_verify_catches_a_missing_adapter(fixture_root, tmp_path) -> None:
    """The base itself, offered as the merge of an adapter, fails every layer and the model outputs."""
    name = "llama-bf16-all"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    report = verify(base, [adapter], base, FULL)
    assert not report.passed
    assert all(not c.passed for c in report.checks if c.name.startswith(("layer", "model")))


def test_verify_catches_wrong_replaced_tensor_and_structure(fixture_root, tmp_path) -> None:
    name = "bert-cls"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    merge(base, [adapter], tmp_path / "out", QUIET)
    shutil.copytree(tmp_path / "out", tmp_path / "bad")
    _corrupt(tmp_path / "bad" / "model.safetensors", "classifier.weight", lambda w: w * 0)
    report = verify(base, [adapter], tmp_path / "bad", LAYERS)
    assert [c.name for c in report.checks if not c.passed] == ["replaced classifier.weight"]
    _corrupt(tmp_path / "bad" / "model.safetensors", "classifier.bias", lambda b: b.half())
    report = verify(base, [adapter], tmp_path / "bad", LAYERS)
    assert not report.passed and "classifier.bias" in report.checks[0].detail


def test_a_reference_that_cannot_run_in_float64_is_a_stated_skip(fixture_root, tmp_path, monkeypatch) -> None:
    """A model whose kernels have no float64 (as Mixtral's fused experts had): not a crash, not a failure; the
    layer checks still decide, and a warning says what was not compared and why."""
    import vera_export.modeling as modeling

    base, adapter = base_dir(fixture_root, "llama-qv"), adapter_dir(fixture_root, "llama-qv")
    merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))

    def no_float64(model, batch):
        raise RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")

    monkeypatch.setattr(modeling, "model_outputs", no_float64)
    report = verify(base, [adapter], tmp_path / "merged", VerifyOptions(progress=False, full_model=True))
    assert report.passed and not any(c.name.startswith("model ") for c in report.checks)
    (warning,) = report.warnings
    assert warning.startswith("model outputs not compared: LlamaForCausalLM cannot run in float64")
    assert "got Double" in warning
