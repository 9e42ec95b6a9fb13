"""The architecture matrix: every family of fixtures/families.py merged, verified, converted to LoRA and exported to
ONNX (or refused before any work, naming the architecture), each checked against PEFT's own forward pass."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.families import FAMILIES, build_family
from tests.helpers import assert_one_error_line, digest, run_cli
from vera_export import OnnxOptions, ToLoraOptions, VerifyOptions, export_onnx, load_adapter, to_lora, verify
from vera_export.model_check import architecture_inputs
from vera_export.modeling import load_model, model_outputs
from vera_export.precision import ulp

# Float32 models, one rounding per merged weight: outputs move by a few roundoffs of their scale.
TOLERANCE = 1e-5


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name) for name in FAMILIES}


def _peft(base: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load_model(base, torch.float32), adapter).eval()


@torch.no_grad()
def _outputs(model: torch.nn.Module, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [next(iter(model_outputs(model, batch).values())).double() for batch in inputs]


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], tolerance: float) -> None:
    for g, w in zip(got, want):
        finite = torch.isfinite(w)  # a padded row some architectures compute as NaN, in both
        assert torch.equal(finite, torch.isfinite(g))
        scale = w[finite].abs().max().item()
        torch.testing.assert_close(g[finite], w[finite], rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_model_is_peft_s_unmerged_one_and_verifies(families, tmp_path, name: str) -> None:
    base, adapter = families[name]
    result = run_cli("merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "merged", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["result"]["folded"]) == len(load_adapter(adapter).layers)
    merged = load_model(tmp_path / "merged", torch.float32)
    inputs = architecture_inputs(merged)
    expected = _outputs(_peft(base, adapter), inputs)
    _assert_close(_outputs(merged, inputs), expected, TOLERANCE)
    # The adapter matters far beyond the tolerance.
    base_outputs = _outputs(load_model(base, torch.float32), inputs)
    assert any(
        (b - e)[torch.isfinite(e)].abs().max() > 100 * TOLERANCE * e[torch.isfinite(e)].abs().max()
        for b, e in zip(base_outputs, expected)
    )
    verified = verify(base, [adapter], tmp_path / "merged", VerifyOptions(progress=False, full_model=True))
    assert verified.passed, verified.text()
    assert any(c.name.startswith("model ") for c in verified.checks) and not verified.warnings, (
        verified.text()
    )
    # And back: every weight within ulp(merged) + ulp(base) of the base, under the checkpoint's own keys.
    back = tmp_path / "back"
    result = run_cli(
        "unmerge", "--merged", tmp_path / "merged", "--adapter", adapter, "--output", back, "--quiet"
    )
    assert result.exit_code == 0, result.output
    original, merged_weights, restored = (
        load_file(d / "model.safetensors") for d in (base, tmp_path / "merged", back)
    )
    assert restored.keys() == original.keys()
    for key, value in original.items():
        bound = ulp(merged_weights[key], value.dtype) + ulp(value, value.dtype)
        assert ((restored[key].double() - value.double()).abs() <= bound).all(), key


@pytest.fixture(scope="session")
def bf16_families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("families-bf16")
    return {name: build_family(name, root / name, dtype=torch.bfloat16) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_a_bfloat16_base_merges_and_verifies(bf16_families, tmp_path, name: str) -> None:
    """Every weight within 1 ulp of the exact sum, and the merged model's outputs within 16 bfloat16 roundoffs
    of the unmerged one's (computed in float32): verify's own layer and model checks."""
    base, adapter = bf16_families[name]
    result = run_cli(
        "merge", "--base", base, "--adapter", adapter, "--output", tmp_path / "merged", "--quiet"
    )
    assert result.exit_code == 0, result.output
    assert next(iter(load_file(tmp_path / "merged" / "model.safetensors").values())).dtype == torch.bfloat16
    verified = verify(base, [adapter], tmp_path / "merged", VerifyOptions(progress=False, full_model=True))
    assert verified.passed and not verified.warnings, verified.text()
    assert sum(c.name.startswith("layer ") for c in verified.checks) == len(load_adapter(adapter).layers)
    assert any(c.name.startswith("model ") for c in verified.checks)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_adapter_reproduces_vera_in_peft(families, tmp_path, name: str) -> None:
    base, adapter = families[name]
    to_lora(base, adapter, tmp_path / "lora", ToLoraOptions(progress=False))
    vera = _peft(base, adapter)
    inputs = architecture_inputs(vera.get_base_model())
    _assert_close(_outputs(_peft(base, tmp_path / "lora"), inputs), _outputs(vera, inputs), 2e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_exports_and_verifies_or_is_refused_up_front(families, tmp_path, name: str) -> None:
    base, adapter = families[name]
    if FAMILIES[name].onnx:
        report = export_onnx(base, [adapter], tmp_path / "onnx", OnnxOptions(progress=False))
        assert report.ok, report.text()
        return
    before = digest(base, adapter)
    result = run_cli("onnx", "--base", base, "--adapter", adapter, "--output", tmp_path / "onnx", "--quiet")
    assert_one_error_line(result, FAMILIES[name].architecture, "vera-export merge", "optimum")
    assert not (tmp_path / "onnx").exists() and digest(base, adapter) == before
