"""Streaming merge and unmerge of whole checkpoints, checked against PEFT and against exact arithmetic."""

from __future__ import annotations

import json
import shutil
import warnings
from fractions import Fraction

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers import (
    ALL_ADAPTERS,
    UNTYING_ADAPTERS,
    adapter_dir,
    base_dir,
    load_base,
    load_peft,
    outputs,
    sample_inputs,
)
from vera_export import (
    MergeOptions,
    UnmergeOptions,
    load_adapter,
    merge,
    merge_into,
    unmerge,
)
from vera_export.io.index import ShardedTensorIndex
from vera_export.names import model_names
from vera_export.plan import build_plan
from vera_export.precision import ulp

QUIET = MergeOptions(progress=False)


def _tensors(model_dir, aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint; with `aliases` (`ModelNames.aliases`), a tied pair stored once under both names."""
    index = ShardedTensorIndex.from_dir(model_dir)
    tensors = {}
    for shard in index.shards:
        tensors.update(load_file(shard))
    tensors.update({alias: tensors[stored] for alias, stored in (aliases or {}).items()})
    return tensors


def _exact_merged(base: dict[str, torch.Tensor], plan) -> dict[str, torch.Tensor]:
    """Float64 `W + sum(delta_W)` of every folded weight (the factors are exact in float64)."""
    exact = {}
    for name, deltas in plan.deltas.items():
        value = base[name].double()
        for delta in deltas:
            left, right = delta.factors()
            value = value + left @ right
        exact[name] = value
    return exact


@pytest.mark.parametrize("name", ALL_ADAPTERS)
def test_merge_layout_and_one_ulp_rule(fixture_root, tmp_path, name: str) -> None:
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    report = merge(base, [adapter], tmp_path / "out", QUIET)
    out = tmp_path / "out"
    loaded = load_adapter(adapter)
    names = model_names(base, ShardedTensorIndex.from_dir(base), [loaded])
    assert bool(names.aliases) == (name in UNTYING_ADAPTERS)
    base_index, out_index = names.output, ShardedTensorIndex.from_dir(out)
    # Same shard split, tensor order, dtypes and shapes (a tied pair the adapter unties stored twice, side by side);
    # the format metadata transformers expects.
    assert [s.name for s in out_index.shards] == [s.name for s in base_index.shards]
    for shard in base_index.shards:
        assert [(i.name, i.dtype, i.shape) for i in out_index.shard_tensors(shard.name)] == [
            (i.name, i.dtype, i.shape) for i in base_index.shard_tensors(shard)
        ]
        with safe_open(out / shard.name, "pt") as f:
            assert f.metadata()["format"] == "pt"
    if base_index.is_sharded:
        assert (
            json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
            == base_index.weight_map
        )
    assert {p.name for p in base.iterdir()} | {"README.md", "vera_export.json"} == {
        p.name for p in out.iterdir()
    }

    config = json.loads((base / "config.json").read_text())
    if names.tied:
        config["tie_word_embeddings"] = False
    assert json.loads((out / "config.json").read_text()) == config
    plan = build_plan([loaded], base_index.tensors)
    before, after = _tensors(base, names.aliases), _tensors(out)
    exact = _exact_merged(before, plan)
    assert sorted(report.folded) == sorted(plan.deltas) and sorted(report.replaced) == sorted(
        plan.replacements
    )
    for key, value in after.items():
        if key in exact:
            error = (value.double() - exact[key]).abs()
            assert (error <= ulp(exact[key], value.dtype)).all(), key
            assert not torch.equal(value, before[key]), key
        elif key in plan.replacements:
            assert torch.equal(value, plan.replacements[key].to(value.dtype)), key
        else:
            assert torch.equal(value, before[key]), key  # untouched tensors are copied byte for byte


@pytest.mark.parametrize("name", ALL_ADAPTERS)
def test_merged_checkpoint_reproduces_peft(fixture_root, tmp_path, name: str) -> None:
    """The merged checkpoint loads with transformers and matches PEFT's unmerged and merged models."""
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    report = merge(base, [adapter], tmp_path / "out", QUIET)
    merged = load_base(tmp_path / "out")
    peft_model = load_peft(base, [adapter])
    inputs = sample_inputs(merged.config.vocab_size)
    dtype = next(merged.parameters()).dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    expected = outputs(peft_model, inputs)
    torch.testing.assert_close(
        outputs(merged, inputs).float(), expected.float(), rtol=tolerance, atol=tolerance
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = peft_model.merge_and_unload()
    # PEFT folds a tied head's delta into the tensor it shares with the input embedding (and warns that this "can
    # lead to complications"); the merge here keeps the embedding as PEFT's forward uses it, compared above.
    aliases = model_names(base, ShardedTensorIndex.from_dir(base), [load_adapter(adapter)]).aliases
    shared = {stored for alias, stored in aliases.items() if alias in report.folded}
    ours, before = _tensors(tmp_path / "out"), _tensors(base, aliases)
    for key, value in peft_merged.state_dict().items():
        if key in shared:
            assert torch.equal(ours[key], before[key]), key
        elif key in ours and ours[key].is_floating_point():
            # Each element agrees with PEFT's merge up to the rounding PEFT adds: a few roundoffs of the delta.
            eps = torch.finfo(value.dtype).eps
            delta = (ours[key].double() - before[key].double()).abs().max().item()
            torch.testing.assert_close(ours[key].double(), value.double(), rtol=2 * eps, atol=4 * eps * delta)


def test_two_adapters_fold_in_order_with_one_rounding(fixture_root, tmp_path) -> None:
    names = ["llama-qv", "llama-qkv-b"]
    base = base_dir(fixture_root, names[0])
    adapters = [adapter_dir(fixture_root, n) for n in names]
    merge(base, adapters, tmp_path / "out", QUIET)
    plan = build_plan([load_adapter(a) for a in adapters], ShardedTensorIndex.from_dir(base).tensors)
    assert max(len(d) for d in plan.deltas.values()) == 2
    before, after = _tensors(base), _tensors(tmp_path / "out")
    for key, value in _exact_merged(before, plan).items():
        assert ((after[key].double() - value).abs() <= ulp(value, after[key].dtype)).all(), key
    merged, peft_model = load_base(tmp_path / "out"), load_peft(base, adapters)
    inputs = sample_inputs(merged.config.vocab_size)
    torch.testing.assert_close(outputs(merged, inputs), outputs(peft_model, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-qv", "llama-bf16-all", "gpt2-attn", "bert-cls", "llama-fp16-qv"])
def test_unmerge_round_trip(fixture_root, tmp_path, name: str) -> None:
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    merge(base, [adapter], tmp_path / "merged", QUIET)
    report = unmerge(tmp_path / "merged", [adapter], tmp_path / "restored", UnmergeOptions(progress=False))
    before, merged, restored = _tensors(base), _tensors(tmp_path / "merged"), _tensors(tmp_path / "restored")
    replaced = set(load_adapter(adapter).replacements)
    assert bool(replaced) == any("cannot be recovered" in w for w in report.warnings)
    for key, value in before.items():
        if key in replaced:
            assert torch.equal(restored[key], merged[key])  # kept as merged, and said so
            continue
        bound = ulp(merged[key], value.dtype) + ulp(value, value.dtype)
        assert ((restored[key].double() - value.double()).abs() <= bound).all(), key


def test_near_cancellation_ours_within_one_ulp_peft_thousands(fixture_root) -> None:
    """On a float32 layer whose weights nearly cancel the delta, PEFT's merge misses by thousands of ulp."""
    name = "llama-qv"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    model = load_base(base)
    plan = build_plan([load_adapter(adapter)], model.state_dict())
    key = "model.layers.0.self_attn.q_proj.weight"
    left, right = plan.deltas[key][0].factors()
    delta = left @ right
    with torch.no_grad():
        weight = model.get_parameter(key)
        mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) < 0.2
        weight[mask] = (-delta).float()[mask]  # W + delta_W cancels to the rounding error of delta_W
    base_weight = weight.detach().clone()
    ours = merge_into(model, [adapter]).get_parameter(key).detach()

    peft_model = load_peft(base, [adapter])
    with torch.no_grad():
        peft_model.get_base_model().get_parameter(key).copy_(base_weight)
        theirs = peft_model.merge_and_unload().get_parameter(key).detach()

    rows, cols = torch.nonzero(mask, as_tuple=True)
    lf = [[Fraction(v) for v in row] for row in left.tolist()]
    rf = [[Fraction(v) for v in row] for row in right.T.tolist()]
    exact = torch.tensor(
        [
            float(Fraction(float(base_weight[i, j])) + sum(a * b for a, b in zip(lf[i], rf[j])))
            for i, j in zip(rows.tolist(), cols.tolist())
        ],
        dtype=torch.float64,
    )
    spacing = ulp(exact, torch.float32)
    ours_ulps = ((ours[rows, cols].double() - exact).abs() / spacing).max().item()
    theirs_ulps = ((theirs[rows, cols].double() - exact).abs() / spacing).max().item()
    assert ours_ulps <= 1.0
    assert theirs_ulps > 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["llama-bf16-all", "llama-qv", "gpt2-attn"])
def test_merge_on_gpu_keeps_the_one_ulp_rule(fixture_root, tmp_path, name: str) -> None:
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    merge(base, [adapter], tmp_path / "out", MergeOptions(device="cuda", progress=False))
    plan = build_plan([load_adapter(adapter)], ShardedTensorIndex.from_dir(base).tensors)
    before, after = _tensors(base), _tensors(tmp_path / "out")
    for key, value in _exact_merged(before, plan).items():
        assert ((after[key].double() - value).abs() <= ulp(value, after[key].dtype)).all(), key


def test_weights_other_than_the_checkpoints_own_are_not_copied_and_named(fixture_root, tmp_path) -> None:
    """Stale weights next to the checkpoint (another format, or safetensors it does not index) would ship the
    unmerged model beside the merged one: skipped, with a warning that names them. Other files travel along."""
    base = tmp_path / "base"
    shutil.copytree(base_dir(fixture_root, "llama-qv"), base)
    (base / "pytorch_model.bin").write_bytes(b"stale")
    (base / "extra").mkdir()
    shutil.copy(base / "model.safetensors", base / "extra" / "model.safetensors")
    (base / "extra" / "notes.txt").write_text("kept")
    report = merge(
        base, [adapter_dir(fixture_root, "llama-qv")], tmp_path / "out", MergeOptions(progress=False)
    )
    (warning,) = [w for w in report.warnings if "not copied" in w]
    assert "pytorch_model.bin" in warning and "extra/model.safetensors" in warning
    assert (
        not (tmp_path / "out" / "pytorch_model.bin").exists()
        and not (tmp_path / "out" / "extra" / "model.safetensors").exists()
    )
    assert (tmp_path / "out" / "extra" / "notes.txt").read_text() == "kept"
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_shards_in_subdirectories_keep_their_paths(fixture_root, tmp_path) -> None:
    """An index may name shards like a/model.safetensors; two such shards may even share a file name."""
    source = base_dir(fixture_root, "llama-qv")
    tensors = load_file(source / "model.safetensors")
    names = list(tensors)
    base = tmp_path / "base"
    for folder in ("a", "b"):
        (base / folder).mkdir(parents=True)
    shutil.copy(source / "config.json", base)
    halves = {
        "a/model.safetensors": names[: len(names) // 2],
        "b/model.safetensors": names[len(names) // 2 :],
    }
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, base / shard, {"format": "pt"})
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    report = merge(
        base, [adapter_dir(fixture_root, "llama-qv")], tmp_path / "out", MergeOptions(progress=False)
    )
    assert report.folded and not report.warnings
    merged = ShardedTensorIndex.from_dir(tmp_path / "out")
    assert merged.weight_map == weight_map
    expected = merge(
        source, [adapter_dir(fixture_root, "llama-qv")], tmp_path / "flat", MergeOptions(progress=False)
    )
    flat = load_file(tmp_path / "flat" / "model.safetensors")
    for shard, keys in halves.items():
        got = load_file(tmp_path / "out" / shard)
        assert all(torch.equal(got[k], flat[k]) for k in keys)
    assert expected.folded == report.folded


@pytest.mark.parametrize("name", UNTYING_ADAPTERS)
def test_a_merge_that_unties_says_so(fixture_root, tmp_path, name: str) -> None:
    """The output stores both sides of the pair and its config no longer ties them, so that transformers loads
    each (a tied config would load the embedding into the head, dropping the head's delta); the user is told."""
    base = base_dir(fixture_root, name)
    report = merge(base, [adapter_dir(fixture_root, name)], tmp_path / "out", QUIET)
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is True
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    (note,) = [w for w in report.warnings if "tied" in w]
    assert "lm_head.weight" in note and "model.embed_tokens.weight" in note
    merged = load_base(tmp_path / "out")
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight


def test_unmerge_of_a_tied_checkpoint_that_peft_merged_subtracts_from_the_shared_tensor(
    fixture_root, tmp_path
) -> None:
    """PEFT's merge_and_unload of a tied head folds the delta into the one stored tensor; unmerging it takes the
    delta out of that tensor again and keeps the pair tied."""
    name = "llama-tied-lmhead"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_peft(base, [adapter]).merge_and_unload().save_pretrained(tmp_path / "peft")
    assert set(_tensors(tmp_path / "peft")) == set(_tensors(base))  # stored once, still tied
    report = unmerge(tmp_path / "peft", [adapter], tmp_path / "out", UnmergeOptions(progress=False))
    assert report.folded == ["model.embed_tokens.weight"] + [n for n in report.folded if "q_proj" in n]
    original, restored, merged = _tensors(base), _tensors(tmp_path / "out"), _tensors(tmp_path / "peft")
    key = "model.embed_tokens.weight"
    assert not torch.equal(merged[key], original[key])
    torch.testing.assert_close(restored[key], original[key], rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
