"""Which tied tensors an adapter unties, found by asking transformers (on the meta device) only when a tensor can
be tied; and the config that says the output no longer ties them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import adapter_dir, base_dir
from vera_export import IncompatibleAdapterError, load_adapter
from vera_export.io.index import ShardedTensorIndex
from vera_export.names import model_names, write_untied_config
from vera_export.plan import build_plan

HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def _names(fixture_root: Path, name: str, base: Path | None = None):
    base = base or base_dir(fixture_root, name)
    index = ShardedTensorIndex.from_dir(base)
    return index, model_names(base, index, [load_adapter(adapter_dir(fixture_root, name))])


@pytest.mark.parametrize(
    ("name", "aliases"),
    [
        ("llama-tied-lmhead", {HEAD: EMBEDDING}),  # the head is adapted, the checkpoint stores the embedding
        ("llama-tied-embed", {HEAD: EMBEDDING}),  # the embedding is replaced, the head keeps the original
        ("llama-lmhead", {}),  # untied: both stored already
    ],
)
def test_a_tied_pair_the_adapter_changes_is_listed_twice(fixture_root, name: str, aliases: dict) -> None:
    index, names = _names(fixture_root, name)
    assert names.aliases == aliases
    assert bool(names.tied) == bool(aliases) and bool(names.notes()) == bool(aliases)
    for alias, stored in aliases.items():
        assert names.index.tensors[alias].offset == index.tensors[stored].offset
        assert alias not in index.tensors


def test_an_adapter_of_plain_layers_costs_nothing(fixture_root) -> None:
    """No tensor it touches can be tied: the index is returned as it is, without building the model."""
    index, names = _names(fixture_root, "llama-qv", fixture_root / "bases" / "llama-tied")
    assert names.index is index and not names.aliases and not names.tied


def test_a_missing_head_on_a_base_that_does_not_tie_it_is_still_refused(fixture_root, tmp_path) -> None:
    """Only transformers' own tying makes a missing weight stand for another: with the tie off, the head is
    absent and the plan says so."""
    base = tmp_path / "base"
    shutil.copytree(base_dir(fixture_root, "llama-tied-lmhead"), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    _, names = _names(fixture_root, "llama-tied-lmhead", base)
    assert not names.aliases
    with pytest.raises(IncompatibleAdapterError, match="module 'lm_head' has no 2-D weight"):
        build_plan([load_adapter(adapter_dir(fixture_root, "llama-tied-lmhead"))], names.index.tensors)


def test_the_untied_config_turns_every_tie_off(tmp_path) -> None:
    config = {
        "architectures": ["X"],
        "tie_word_embeddings": True,
        "text_config": {"tie_word_embeddings": True},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_untied_config(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["tie_word_embeddings"] is False and written["text_config"]["tie_word_embeddings"] is False
    assert written["architectures"] == ["X"]


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> tuple[Path, Path]:
    """transformers 5 names ViT's modules q_proj / fc1; its checkpoints keep attention.attention.query."""
    from fixtures.families import build_family

    return build_family("vit", tmp_path_factory.mktemp("vit"))


def test_keys_transformers_renames_are_planned_by_the_model_s_names_and_written_by_the_checkpoint_s(
    vit,
) -> None:
    base, adapter = vit
    index = ShardedTensorIndex.from_dir(base)
    loaded = load_adapter(adapter)
    names = model_names(base, index, [loaded])
    query, q_proj = (
        "vit.encoder.layer.0.attention.attention.query.weight",
        "vit.layers.0.attention.q_proj.weight",
    )
    assert names.renames[q_proj] == query and query in index.tensors
    assert q_proj in names.index.tensors and query not in names.index.tensors
    assert names.output is index  # the output keeps the checkpoint's keys, nothing added
    plan = names.to_checkpoint(build_plan([loaded], names.index.tensors))
    assert query in plan.deltas and q_proj not in plan.deltas
    assert all(name in index.tensors for name in plan.deltas)


def test_a_config_that_ties_nothing_is_taken_at_its_word(fixture_root) -> None:
    """An untied lm_head (its base copy saved by PEFT) on a base whose config says tie_word_embeddings false:
    transformers, seconds to import, is not needed to tell."""
    base, adapter = base_dir(fixture_root, "llama-lmhead"), adapter_dir(fixture_root, "llama-lmhead")
    code = (
        "import sys; from vera_export import load_adapter; from vera_export.io.index import ShardedTensorIndex; "
        "from vera_export.names import model_names; from pathlib import Path; "
        f"n = model_names(Path({str(base)!r}), ShardedTensorIndex.from_dir({str(base)!r}), [load_adapter({str(adapter)!r})]); "
        "print(not n.tied and 'transformers' not in sys.modules)"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "True"
    )
