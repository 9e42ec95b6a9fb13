"""Loading an adapter without PEFT: every tensor PEFT trains is found under the name it changes, every malformed
checkpoint is refused with all its problems at once, and a pickle is only read when allowed, never run."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import adapter_dir, base_dir, cli_merge, digest, load_base, pickle_adapter
from vera_export.adapter import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, load_adapter, read_adapter_tensors
from vera_export.errors import AdapterError

_LAMBDA = "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_"


@pytest.mark.parametrize("name", ["llama-qv", "gpt2-attn", "bert-cls", "bert-all-bias", "llama-tied-embed"])
def test_every_tensor_peft_trains_is_found_under_the_name_it_changes(fixture_root: Path, name: str) -> None:
    """PEFT's own trainable parameters, names mapped back to the base's: the same set and the same values."""
    from peft import PeftModel

    from fixtures.build import ADAPTERS

    adapter = load_adapter(adapter_dir(fixture_root, name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_base(fixture_root / "bases" / ADAPTERS[name].base)
        peft_model = PeftModel.from_pretrained(base, adapter_dir(fixture_root, name), is_trainable=True)
    trained = {}
    for key, param in peft_model.named_parameters():
        if param.requires_grad:
            key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            trained[key.replace(".modules_to_save.default.", ".").removesuffix(".default")] = param.detach()
    ours = {
        f"{m}.vera_lambda_{k}": getattr(layer, f"lambda_{k}")
        for m, layer in adapter.layers.items()
        for k in "bd"
    }
    ours |= adapter.replacements
    assert ours.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(ours[key].to(value.dtype), value), key
    assert adapter.num_trainable_parameters() == peft_model.get_nb_trainable_parameters()[0]
    assert not any(".original_module." in key for key in adapter.replacements)


def test_a_loaded_adapter_keeps_what_it_was_read_from(fixture_root: Path) -> None:
    path = adapter_dir(fixture_root, "bert-cls")
    adapter = load_adapter(path)
    assert adapter.path == path and adapter.name == "bert-cls"
    assert adapter.raw_config == json.loads((path / "adapter_config.json").read_text())
    assert adapter.weights_file == path / WEIGHTS_NAME
    stored = load_file(path / WEIGHTS_NAME)
    assert adapter.tensors.keys() == stored.keys()
    for key, tensor in stored.items():
        assert adapter.tensors[key].dtype == tensor.dtype and torch.equal(adapter.tensors[key], tensor), key
    assert adapter.vera_A is None and adapter.vera_B is None  # saved with save_projection=False


def test_two_loads_are_two_adapters_with_equal_content(fixture_root: Path) -> None:
    first, second = (load_adapter(adapter_dir(fixture_root, "llama-qv")) for _ in range(2))
    assert first != second and len({first: 1, second: 2}) == 2
    assert first == first and load_adapter(first) is first  # an adapter already loaded is returned as it is
    assert first.config == second.config and first.layers.keys() == second.layers.keys()
    for module, layer in first.layers.items():
        assert torch.equal(layer.lambda_b, second.layers[module].lambda_b)
        assert torch.equal(layer.lambda_d, second.layers[module].lambda_d)
    assert torch.equal(first.vera_A, second.vera_A) and torch.equal(first.vera_B, second.vera_B)


def test_with_projections_is_a_new_adapter_holding_them(fixture_root: Path) -> None:
    adapter = load_adapter(adapter_dir(fixture_root, "llama-all-noproj"))
    vera_A, vera_B = torch.ones(16, 96), torch.ones(96, 16)
    pinned = adapter.with_projections(vera_A, vera_B)
    assert pinned is not adapter and pinned != adapter
    assert pinned.vera_A is vera_A and pinned.vera_B is vera_B and adapter.vera_A is None
    assert pinned.layers is adapter.layers and pinned.path == adapter.path


def _adapter(tmp_path: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    """An adapter directory of r=2 with these tensors, in a new folder of `tmp_path`."""
    path = tmp_path / f"adapter-{len(list(tmp_path.iterdir()))}"
    path.mkdir()
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "VERA", "r": 2, "target_modules": ["q_proj"], **config})
    )
    save_file(tensors, path / WEIGHTS_NAME)
    return path


def _layer(b: torch.Tensor | None = None, d: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    tensors = {"base_model.vera_A": torch.rand(2, 8), "base_model.vera_B": torch.rand(8, 2)}
    tensors[f"{_LAMBDA}b"] = torch.rand(8) if b is None else b
    tensors[f"{_LAMBDA}d"] = torch.rand(2) if d is None else d
    return tensors


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda t: t.update({"vera_A": torch.ones(1)}), ["unexpected tensor 'vera_A'"]),
        (lambda t: t.pop(f"{_LAMBDA}d"), ["module 'model.layers.0.self_attn.q_proj' has no vera_lambda_d"]),
        (
            lambda t: t.update({f"{_LAMBDA}b": torch.ones(2, 4)}),
            ["lambdas must be vectors, found shapes [2, 4]"],
        ),
        (lambda t: t.update({f"{_LAMBDA}d": torch.ones(3)}), ["vera_lambda_d has length 3 but r is 2"]),
        (lambda t: t.pop("base_model.vera_B"), ["only one of base_model.vera_A, base_model.vera_B"]),
        (
            lambda t: t.update({"base_model.vera_A": torch.ones(3, 8)}),
            ["vera_A has shape [3, 8], expected [r=2"],
        ),
        (
            lambda t: t.update({"base_model.vera_B": torch.ones(8)}),
            ["vera_B has shape [8], expected [max_out, r=2]"],
        ),
        (
            lambda t: t.update({f"{_LAMBDA}b": torch.ones(8, dtype=torch.int32)}),
            ["expected a floating point"],
        ),
        (lambda t: t["base_model.vera_A"].__setitem__((0, 0), float("inf")), ["vera_A contains NaN or Inf"]),
        (
            lambda t: [t.pop(k) for k in list(t) if "lambda" in k],
            ["no vera_lambda_b / vera_lambda_d tensors"],
        ),
        # Every problem at once, not the first one found.
        (
            lambda t: t.update({"stray": torch.ones(1), f"{_LAMBDA}d": torch.full((2,), float("nan"))}),
            ["unexpected tensor 'stray'", "lambda_d contains NaN or Inf"],
        ),
    ],
)
def test_a_malformed_checkpoint_is_refused_naming_every_problem(tmp_path: Path, change, fragments) -> None:
    tensors = _layer()
    change(tensors)
    path = _adapter(tmp_path, tensors)
    with pytest.raises(AdapterError) as caught:
        load_adapter(path)
    assert str(caught.value).startswith(f"{path / WEIGHTS_NAME}: ")
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_projections_against_save_projection(tmp_path: Path) -> None:
    """Missing when they should be stored: refused, saying how to regenerate them; stored when they need not be:
    used, with a note."""
    without = {k: v for k, v in _layer().items() if "lambda" in k}
    with pytest.raises(AdapterError, match="save_projection is true but base_model.vera_A .* are missing"):
        load_adapter(_adapter(tmp_path, without))
    adapter = load_adapter(_adapter(tmp_path, _layer(), save_projection=False))
    assert adapter.vera_A is not None
    assert adapter.warnings == [
        "save_projection is false but vera_A / vera_B are stored; using the stored projections"
    ]


def test_16_bit_and_64_bit_tensors_load_in_float32_as_peft_holds_them(tmp_path: Path) -> None:
    tensors = {k: v.to(torch.bfloat16) for k, v in _layer().items()}
    tensors[f"{_LAMBDA}d"] = torch.tensor([0.1, 0.3], dtype=torch.float64)
    adapter = load_adapter(_adapter(tmp_path, tensors))
    layer = adapter.layers["model.layers.0.self_attn.q_proj"]
    assert layer.lambda_b.dtype == layer.lambda_d.dtype == adapter.vera_A.dtype == torch.float32
    assert torch.equal(layer.lambda_d, tensors[f"{_LAMBDA}d"].float())
    assert adapter.tensors[f"{_LAMBDA}d"].dtype == torch.float64  # the raw tensors stay as stored


def test_an_adapter_saved_in_float64_loads_as_peft_loads_it(fixture_root, tmp_path) -> None:
    """PEFT keeps lambdas and projections in float32: float64 values load rounded, and fold as such."""
    source = adapter_dir(fixture_root, "llama-qv")
    tensors = {
        k: v.double() * (1 + 2.0**-30) for k, v in load_file(source / "adapter_model.safetensors").items()
    }
    wide = tmp_path / "float64"
    wide.mkdir()
    shutil.copy(source / "adapter_config.json", wide)
    save_file(tensors, wide / "adapter_model.safetensors")
    adapter = load_adapter(wide)
    layer = next(iter(adapter.layers.values()))
    assert layer.lambda_b.dtype == layer.lambda_d.dtype == adapter.vera_A.dtype == torch.float32
    key = f"base_model.model.{layer.module}.vera_lambda_b"
    assert torch.equal(layer.lambda_b, tensors[key].float())


# --- pickles ---------------------------------------------------------------------------------------------------


def test_no_weights_at_all_is_an_incomplete_adapter(tmp_path: Path) -> None:
    path = _adapter(tmp_path, _layer())
    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=f"no {WEIGHTS_NAME}; the adapter directory is incomplete"):
        load_adapter(path)


def test_a_pickle_is_read_only_when_allowed(fixture_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    shutil.copytree(adapter_dir(fixture_root, "llama-qv"), path)
    stored = load_file(path / WEIGHTS_NAME)
    pickle_adapter(path)
    with pytest.raises(AdapterError, match="pickle file, which can run code .* --allow-pickle"):
        read_adapter_tensors(path)
    weights_file, tensors = read_adapter_tensors(path, allow_pickle=True)
    assert weights_file == path / PICKLE_WEIGHTS_NAME and tensors.keys() == stored.keys()
    assert load_adapter(path, allow_pickle=True).weights_file == path / PICKLE_WEIGHTS_NAME
    torch.save([stored[k] for k in stored], path / PICKLE_WEIGHTS_NAME)
    with pytest.raises(AdapterError, match="expected a dict of tensors"):
        read_adapter_tensors(path, allow_pickle=True)


def test_pickle_loads_only_when_allowed_and_never_runs_code(work) -> None:
    tmp_path, base, adapter = work
    pickle_adapter(adapter)
    assert cli_merge(tmp_path, base, adapter, "--allow-pickle").exit_code == 0

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Exploit()}, adapter / "adapter_model.bin")
    before = digest(base, adapter)
    result = cli_merge(tmp_path, base, adapter, "--allow-pickle", output=tmp_path / "out2")
    assert result.exit_code == 2 and "refused by torch.load(weights_only=True)" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "weights_only=False" not in result.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out2").exists()
    assert digest(base, adapter) == before


def test_replacements_fit_the_base_they_were_trained_on(fixture_root: Path) -> None:
    """Trained biases and heads replace tensors the base really has, of the same shape."""
    from vera_export.io.index import ShardedTensorIndex

    for name in ("gpt2-attn", "bert-cls", "gpt2-all-bias"):
        tensors = ShardedTensorIndex.from_dir(base_dir(fixture_root, name)).tensors
        for key, value in load_adapter(adapter_dir(fixture_root, name)).replacements.items():
            assert tuple(value.shape) == tensors[key].shape, key
