"""Export to LoRA: PEFT loads the result as plain LoRA and reproduces the VeRA model; factors are exact up to one
rounding; rank-K truncation is optimal and beats PEFT's `convert_to_lora`."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import adapter_dir, base_dir, load_base, load_peft, outputs, sample_inputs
from vera_export import AdapterError, OutputError, ToLoraOptions, load_adapter
from vera_export.io.index import ShardedTensorIndex
from vera_export.lora import balance, exact_lora_factors, server_warnings, to_lora
from vera_export.names import model_names
from vera_export.plan import build_plan

WEIGHTS = "adapter_model.safetensors"
# Largest output difference, relative to the largest output, by (base dtype, LoRA dtype). PEFT runs both adapters
# in float32 and adds to the base's output, so with float32 factors only the order of float32 operations differs
# (observed 3e-7); 16-bit factors add their rounding (observed 1.7e-3 for bfloat16, 2.3e-4 for float16); a 16-bit
# base rounds every layer's output to its dtype, so one flipped rounding shows at 2**-8 (bf16) / 2**-11 (fp16).
TOLERANCE = {
    (torch.float32, torch.float32): 2e-6,
    (torch.float32, torch.bfloat16): 1e-2,
    (torch.float32, torch.float16): 2e-3,
    (torch.bfloat16, torch.float32): 3e-2,
    (torch.bfloat16, torch.bfloat16): 3e-2,
    (torch.float16, torch.float32): 4e-3,
    (torch.float16, torch.float16): 4e-3,
}


def _load_lora(base: Path, lora: Path) -> torch.nn.Module:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load_base(base), lora).eval()


def _exact_deltas(base: Path, adapter: Path) -> dict[str, tuple[torch.Tensor, object]]:
    """Module -> (delta_W in [out, in] layout, float64, exact up to float64 summation; its LayerDelta)."""
    vera = load_adapter(adapter)
    plan = build_plan([vera], model_names(base, ShardedTensorIndex.from_dir(base), [vera]).index.tensors)
    deltas = {}
    for (delta,) in plan.deltas.values():
        left, right = delta.factors()
        product = left @ right
        deltas[delta.target.module] = (product.T if delta.target.fan_in_fan_out else product, delta)
    return deltas


def _factors(lora: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(lora / WEIGHTS)
    key = f"base_model.model.{module}"
    return tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("llama-qv", torch.float32),
        ("llama-all-noproj", torch.bfloat16),
        ("llama-layers", torch.float32),
        ("llama-regex", torch.float16),
        ("llama-bf16-all", torch.float32),
        ("llama-bf16-all", torch.bfloat16),
        ("llama-fp16-qv", torch.float16),
        ("gpt2-attn", torch.float32),
        ("gpt2-all-bias", torch.bfloat16),
        ("bert-cls", torch.float32),
        ("bert-cls", torch.float16),
        ("llama-tied-lmhead", torch.float32),
    ],
)
def test_lora_adapter_reproduces_vera_in_peft(fixture_root, tmp_path, name: str, dtype: torch.dtype) -> None:
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    report = to_lora(base, adapter, tmp_path / "lora", ToLoraOptions(dtype=dtype))
    lora_model, vera_model = _load_lora(base, tmp_path / "lora"), load_peft(base, [adapter])
    assert type(lora_model.peft_config["default"]).__name__ == "LoraConfig"
    inputs = sample_inputs(vera_model.config.vocab_size)
    expected, actual = outputs(vera_model, inputs).double(), outputs(lora_model, inputs).double()
    model_dtype = next(lora_model.parameters()).dtype
    scale = expected.abs().max().item()
    tolerance = TOLERANCE[model_dtype, dtype] * scale
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance)
    # The adapter matters far beyond the tolerance: the base model alone is off.
    assert (outputs(load_base(base), inputs).double() - expected).abs().max() > 10 * tolerance
    # PEFT would save back exactly what was written: same keys (biases, heads included), same values.
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(lora_model, save_embedding_layers=False)
    written = load_file(tmp_path / "lora" / WEIGHTS)
    assert sorted(saved) == sorted(written)
    for key, value in written.items():
        assert torch.equal(saved[key].to(value.dtype), value), key
    assert sorted(report.carried) == sorted(k for k in written if ".lora_" not in k)


@pytest.mark.parametrize(
    "name", ["gpt2-attn", "bert-cls", "llama-layers", "llama-all-noproj", "llama-lmhead", "llama-tied-lmhead"]
)
def test_config_is_plain_lora_with_scaling_one(fixture_root, tmp_path, name: str) -> None:
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    to_lora(base, adapter, tmp_path / "lora")
    vera = json.loads((adapter / "adapter_config.json").read_text())
    lora = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert lora["peft_type"] == "LORA" and lora["r"] == lora["lora_alpha"] == vera["r"]
    assert lora["use_rslora"] is False and lora["use_dora"] is False
    assert lora["bias"] == {"none": "none", "all": "all", "vera_only": "lora_only"}[vera["bias"]]
    for field in (
        "target_modules",
        "fan_in_fan_out",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "task_type",
        "base_model_name_or_path",
    ):
        assert lora[field] == vera[field], field
    model = _load_lora(base, tmp_path / "lora")
    scalings = [
        m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")
    ]
    assert len(scalings) == len(load_adapter(adapter).layers) and set(scalings) == {1.0}


def test_a_regex_target_drops_the_layer_filters_peft_lora_refuses_next_to_it(fixture_root, tmp_path) -> None:
    """PEFT's VeRA ignores layers_to_transform beside a regex target_modules; its LoraConfig refuses the pair."""
    name = "llama-regex"
    base, adapter = base_dir(fixture_root, name), tmp_path / "vera"
    shutil.copytree(adapter_dir(fixture_root, name), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "layers_to_transform": [1], "layers_pattern": "layers"})
    )
    to_lora(base, adapter, tmp_path / "lora")
    lora = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert lora["target_modules"] == config["target_modules"] and "layers_to_transform" not in lora
    model = _load_lora(base, tmp_path / "lora")
    assert sum(1 for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")) == len(
        load_adapter(adapter).layers
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name", ["llama-qv", "gpt2-attn", "llama-bf16-all", "llama-lmhead", "llama-tied-lmhead"]
)
def test_factors_equal_the_vera_delta_up_to_one_rounding(fixture_root, tmp_path, name: str, dtype) -> None:
    """lora_A is the projection scaled by a power of two per row, lora_B carries both lambdas; each is rounded once
    to `dtype`, so every element of lora_B @ lora_A is within the propagated rounding bound of the exact delta
    (only lora_B's rounding where `dtype` holds the projection, as float32 always does)."""
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    report = to_lora(base, adapter, tmp_path / "lora", ToLoraOptions(dtype=dtype))
    u = torch.finfo(dtype).eps / 2
    floor = (
        torch.finfo(dtype).tiny * u
    )  # half the subnormal spacing: float16's small elements round absolutely
    deltas = _exact_deltas(base, adapter)
    for layer in report.layers:
        delta, d = deltas[layer.module]
        t = d.target
        exact_A, exact_B = exact_lora_factors(
            d.lambda_b, d.lambda_d, d.projections.vera_A, d.projections.vera_B, t.in_features, t.out_features
        )
        scaled_A, scaled_B = balance(exact_A, exact_B)
        powers = scaled_A[:, :1] / exact_A[:, :1]
        assert torch.equal(scaled_A, exact_A * powers) and torch.equal(powers.log2().round().exp2(), powers)
        lora_A, lora_B = (f.double() for f in _factors(tmp_path / "lora", layer.module))
        assert torch.equal(lora_A, scaled_A.to(dtype).double()) and torch.equal(
            lora_B, scaled_B.to(dtype).double()
        )

        error_B = torch.maximum(u * scaled_B.abs(), torch.tensor(floor, dtype=torch.float64))
        error_A = torch.maximum(u * scaled_A.abs(), torch.tensor(floor, dtype=torch.float64))
        if torch.equal(lora_A, scaled_A):
            error_A = torch.zeros_like(error_A)
        # 2**-52 relative on top: lora_B's float64 value and the float64 reference product round too.
        magnitude = scaled_B.abs() @ scaled_A.abs()
        bound = (
            error_B @ (scaled_A.abs() + error_A)
            + scaled_B.abs() @ error_A
            + (exact_A.shape[0] + 2) * 2.0**-52 * magnitude
        )
        assert ((lora_B @ lora_A - delta).abs() <= bound).all(), layer.module
        if dtype == torch.float32:
            assert torch.equal(lora_A, scaled_A)  # float32 holds the projection: only lora_B is rounded
        # The reported rounding error is the measured one.
        measured = ((lora_B @ lora_A - delta).norm() / delta.norm()).item()
        assert layer.rounding_error == pytest.approx(measured, rel=1e-3)
        assert 0 < measured < 4 * u


def test_one_factor_rounding_beats_rounding_both(fixture_root) -> None:
    """Putting both lambdas on lora_B (lora_A exact) halves the error bound of PEFT's split, and shows."""
    name = "llama-all-noproj"
    ours, peft_split = [], []
    for delta, d in _exact_deltas(base_dir(fixture_root, name), adapter_dir(fixture_root, name)).values():
        t = d.target
        lora_A, lora_B = exact_lora_factors(
            d.lambda_b, d.lambda_d, d.projections.vera_A, d.projections.vera_B, t.in_features, t.out_features
        )
        ours.append((lora_B.float().double() @ lora_A - delta).norm() / delta.norm())
        left = d.lambda_b.double()[:, None] * d.projections.vera_B[: t.out_features].double()
        right = d.lambda_d.double()[:, None] * d.projections.vera_A[:, : t.in_features].double()
        peft_split.append((left.float().double() @ right.float().double() - delta).norm() / delta.norm())
    assert max(ours) < 2.0**-24 and torch.stack(ours).mean() < 0.85 * torch.stack(peft_split).mean()


@pytest.mark.parametrize(
    "name, rank", [("llama-qv", 4), ("gpt2-attn", 3), ("bert-cls", 2), ("llama-bf16-all", 7)]
)
def test_rank_k_is_the_optimal_truncation(fixture_root, tmp_path, name: str, rank: int) -> None:
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    report = to_lora(base, adapter, tmp_path / "lora", ToLoraOptions(rank=rank))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (report.rank, report.exact, config["r"], config["lora_alpha"]) == (rank, False, rank, rank)
    deltas = _exact_deltas(base, adapter)
    dropped = total = 0.0
    for layer in report.layers:
        delta, _ = deltas[layer.module]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # the full delta, float64: the reference
        optimum = (s[rank:] ** 2).sum().sqrt() / s.norm()
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        lora_A, lora_B = (t.double() for t in _factors(tmp_path / "lora", layer.module))
        assert lora_A.shape == (rank, delta.shape[1]) and lora_B.shape == (delta.shape[0], rank)
        assert layer.truncation_error == pytest.approx(optimum.item(), rel=1e-9)
        # What was written is the optimum up to rounding the factors to float32.
        assert ((lora_B @ lora_A - best).norm() / s.norm()).item() < 2.0**-23
        dropped, total = dropped + (s[rank:] ** 2).sum().item(), total + (s**2).sum().item()
    assert report.total_truncation_error == pytest.approx((dropped / total) ** 0.5, rel=1e-9)


@pytest.mark.parametrize("name", ["llama-qv", "llama-all-noproj"])
def test_rank_k_beats_peft_convert_to_lora(fixture_root, tmp_path, name: str) -> None:
    """Same rank: both reach the optimum's error, but PEFT's float32 SVD of the float32 delta strays from the
    optimal factors 10 to 100 times more than ours."""
    from peft.tuners.lora.conversion import convert_to_lora

    rank = 4
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    to_lora(base, adapter, tmp_path / "lora", ToLoraOptions(rank=rank))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, theirs = convert_to_lora(load_peft(base, [adapter]), rank, adapter_name="a0")
    for module, (delta, _) in _exact_deltas(base, adapter).items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        lora_A, lora_B = (t.double() for t in _factors(tmp_path / "lora", module))
        key = f"base_model.model.{module}"
        their_A, their_B = theirs[f"{key}.lora_A.weight"].double(), theirs[f"{key}.lora_B.weight"].double()
        ours_off = (lora_B @ lora_A - best).norm() / s.norm()
        theirs_off = (their_B @ their_A - best).norm() / s.norm()
        assert ours_off < 2.0**-24 and 3 * ours_off < theirs_off, module


def test_peft_convert_to_lora_refuses_trained_biases(fixture_root, tmp_path) -> None:
    """The claim in the docs: PEFT cannot convert adapters with trained biases; to_lora carries them over."""
    from peft.tuners.lora.conversion import convert_to_lora

    name = "gpt2-attn"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    with pytest.raises(ValueError, match="bias"):
        convert_to_lora(load_peft(base, [adapter]), 4, adapter_name="a0")
    assert to_lora(base, adapter, tmp_path / "lora").carried


def test_rank_at_or_above_r_is_the_exact_export(fixture_root, tmp_path) -> None:
    name = "llama-qv"  # r = 8
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    exact = to_lora(base, adapter, tmp_path / "exact")
    above = to_lora(base, adapter, tmp_path / "above", ToLoraOptions(rank=12))
    assert any("above the adapter's r" in line for line in above.warnings)
    assert exact.exact and above.exact and above.rank == 8
    assert load_file(tmp_path / "exact" / WEIGHTS).keys() == load_file(tmp_path / "above" / WEIGHTS).keys()
    for key, value in load_file(tmp_path / "exact" / WEIGHTS).items():
        assert torch.equal(value, load_file(tmp_path / "above" / WEIGHTS)[key])
    with pytest.raises(ValueError, match="positive"):
        to_lora(base, adapter, tmp_path / "zero", ToLoraOptions(rank=0))
    with pytest.raises(ValueError, match="float64"):
        to_lora(base, adapter, tmp_path / "f64", ToLoraOptions(dtype="float64"))
    with pytest.raises(OutputError, match="not empty"):
        to_lora(base, adapter, tmp_path / "exact")
    to_lora(base, adapter, tmp_path / "exact", ToLoraOptions(force=True, progress=False))


def test_server_warnings(fixture_root, tmp_path) -> None:
    name = "bert-cls"
    lines = to_lora(base_dir(fixture_root, name), adapter_dir(fixture_root, name), tmp_path / "lora").warnings
    assert len(lines) == 2
    assert "modules_to_save" in lines[0] and "'lora_only'" in lines[1]
    plain = {"bias": "none", "modules_to_save": None}
    assert server_warnings(16, plain) == []
    assert "--max-lora-rank 32" in server_warnings(17, plain)[0]
    assert "--max-lora-rank 320" in server_warnings(300, plain)[0]
    assert "largest max_lora_rank" in server_warnings(513, plain)[0]


def test_balance_is_exact_and_keeps_float16_factors_in_range() -> None:
    generator = torch.Generator().manual_seed(0)
    vera_A = torch.rand(8, 32, generator=generator) - 0.5
    vera_B = torch.rand(48, 8, generator=generator) - 0.5
    lambda_d = torch.randn(8, generator=generator)
    for scale in (1e-7, 1e8):  # unbalanced, lora_B would underflow / overflow float16
        lambda_b = torch.randn(48, generator=generator) * scale
        lora_A, lora_B = exact_lora_factors(lambda_b, lambda_d, vera_A, vera_B, 32, 48)
        balanced_A, balanced_B = balance(lora_A, lora_B)
        assert torch.equal(
            balanced_B @ balanced_A, lora_B @ lora_A
        )  # powers of two: the same float64 product
        ratio = balanced_B.abs().amax(dim=0) / balanced_A.abs().amax(dim=1)
        assert ((ratio > 0.25) & (ratio < 4)).all()
        exact = lora_B @ lora_A
        rounded = balanced_B.half().double() @ balanced_A.half().double()
        assert ((rounded - exact).norm() / exact.norm()).item() < 1e-3  # float16's u is 4.9e-4
        naive = lora_B.half().double() @ lora_A.half().double()
        assert not torch.isfinite(naive).all() or ((naive - exact).norm() / exact.norm()).item() > 0.3


def test_factors_that_overflow_float16_are_refused(fixture_root, tmp_path) -> None:
    name = "llama-qv"
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir(fixture_root, name), adapter)
    tensors = load_file(adapter / WEIGHTS)
    for key in tensors:
        if key.endswith("vera_lambda_b"):
            tensors[key] = tensors[key] * 1e14  # |delta_W| ~ 1e12: beyond float16 even when balanced
    save_file(tensors, adapter / WEIGHTS, metadata={"format": "pt"})
    base = base_dir(fixture_root, name)
    with pytest.raises(AdapterError, match="overflow torch.float16"):
        to_lora(base, adapter, tmp_path / "fp16", ToLoraOptions(dtype="float16"))
    assert not (tmp_path / "fp16").exists()
    report = to_lora(base, adapter, tmp_path / "fp32")
    assert report.max_rounding_error < 2.0**-24
