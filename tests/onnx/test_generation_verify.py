"""Verification of text-generation packages: tight at every precision, and honest about what it cannot run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.onnx.helpers import Packages
from vera_export import VerifyOnnxOptions, verify_onnx
from vera_export.onnx.generation_verify import NEW_TOKENS, _float_activations
from vera_export.onnx.graph import MODEL_NAME


def _one_lambda_off(adapter: Path, out: Path, factor: float = 1.01) -> Path:
    """A copy of the adapter with one element of one layer's lambda_b changed by `factor`."""
    shutil.copytree(adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("vera_lambda_b"))[-1]
    tensors[key][0] *= factor
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    ("adapter", "mode", "precision"),
    [
        ("llama-gen-qv", "adapter", "fp32"),
        ("llama-gen-qv", "merged", "fp32"),
        ("llama-gen-all", "adapter", "fp16"),
        ("llama-gen-all", "adapter", "int4"),
        ("llama-gen-all", "merged", "int4"),
    ],
)
def test_one_lambda_one_percent_off_fails_at_every_precision(
    packages: Packages, tmp_path: Path, adapter: str, mode: str, precision: str
) -> None:
    package = packages[adapter, mode, precision]
    assert verify_onnx(package.directory, package.base, [package.adapter]).passed
    wrong = _one_lambda_off(package.adapter, tmp_path / "wrong")
    report = verify_onnx(package.directory, package.base, [wrong], VerifyOnnxOptions(progress=False))
    failed = [c.name for c in report.checks if not c.passed]
    # The weights (or lambdas) are not the wrong adapter's, and the graph's own adapter is no longer the
    # reference's; decoding with the file of the (negated) wrong adapter still matches its reference.
    assert failed[0] == "package weights and lambdas, bit for bit", failed
    assert all(", exported," in name for name in failed[1:]), failed


def test_every_step_is_checked(packages: Packages) -> None:
    report = packages["llama-gen-qv", "adapter", "fp32"].report
    logits = [c for c in report.verification.checks if c.name.startswith("genai ")]
    assert logits and all(f"{NEW_TOKENS} new" in c.name for c in logits)


def test_int4_is_checked_with_float_activations_and_reports_the_shipped_ones(packages: Packages) -> None:
    report = packages["llama-gen-all", "adapter", "int4"].report
    details = [c.detail for c in report.verification.checks if c.name.startswith("genai ")]
    assert details and all("as shipped (int8 activations)" in d and "not gated" in d for d in details)
    # Nothing was left beside the package.
    directory = packages["llama-gen-all", "adapter", "int4"].directory
    assert sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(".")) == []


def test_the_float_activation_copy_changes_only_the_accuracy_level(
    packages: Packages, tmp_path: Path
) -> None:
    import onnx

    directory = packages["llama-gen-all", "merged", "int4"].directory
    copy = _float_activations(directory, tmp_path / "copy")
    ours = onnx.load(str(copy / MODEL_NAME), load_external_data=False)
    theirs = onnx.load(str(directory / MODEL_NAME), load_external_data=False)
    levels = {
        a.i
        for n in ours.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    shipped = {
        a.i
        for n in theirs.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {1} and shipped == {4}
    for node in theirs.graph.node:
        for attribute in node.attribute:
            if attribute.name == "accuracy_level":
                attribute.i = 1
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in directory.iterdir())
    assert (directory / "model.onnx.data").stat().st_nlink == 1  # copied, not linked


def test_a_package_genai_cannot_load_is_a_failed_check(packages: Packages, tmp_path: Path) -> None:
    package = packages["llama-gen-qv", "merged", "fp32"]
    broken = tmp_path / "broken"
    shutil.copytree(package.directory, broken)
    (broken / "model.onnx.data").write_bytes(b"")
    report = verify_onnx(broken, package.base, [package.adapter], VerifyOnnxOptions(progress=False))
    assert not report.passed and any(not c.passed and "loads" in c.name for c in report.checks)
