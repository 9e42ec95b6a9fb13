"""Which tied tensors an adapter unties, found by asking transformers (on the meta device) only when a tensor can
be tied; and the config that says the output no longer ties them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import adapter_dir, base_dir
from vera_export import IncompatibleAdapterError, load_adapter
from vera_export.io.index import ShardedTensorIndex
from vera_export.plan import build_plan
from vera_export.tying import untie, write_untied_config

HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def _untie(fixture_root: Path, name: str, base: Path | None = None):
    base = base or base_dir(fixture_root, name)
    index = ShardedTensorIndex.from_dir(base)
    return index, untie(base, index, [load_adapter(adapter_dir(fixture_root, name))])


@pytest.mark.parametrize(
    ("name", "aliases"),
    [
        ("llama-tied-lmhead", {HEAD: EMBEDDING}),  # the head is adapted, the checkpoint stores the embedding
        ("llama-tied-embed", {HEAD: EMBEDDING}),  # the embedding is replaced, the head keeps the original
        ("llama-lmhead", {}),  # untied: both stored already
    ],
)
def test_a_tied_pair_the_adapter_changes_is_listed_twice(fixture_root, name: str, aliases: dict) -> None:
    index, untying = _untie(fixture_root, name)
    assert untying.aliases == aliases
    assert bool(untying.tied) == bool(aliases) and bool(untying.notes()) == bool(aliases)
    for alias, stored in aliases.items():
        assert untying.index.tensors[alias].offset == index.tensors[stored].offset
        assert alias not in index.tensors


def test_an_adapter_of_plain_layers_costs_nothing(fixture_root) -> None:
    """No tensor it touches can be tied: the index is returned as it is, without building the model."""
    index, untying = _untie(fixture_root, "llama-qv", fixture_root / "bases" / "llama-tied")
    assert untying.index is index and not untying.aliases and not untying.tied


def test_a_missing_head_on_a_base_that_does_not_tie_it_is_still_refused(fixture_root, tmp_path) -> None:
    """Only transformers' own tying makes a missing weight stand for another: with the tie off, the head is
    absent and the plan says so."""
    base = tmp_path / "base"
    shutil.copytree(base_dir(fixture_root, "llama-tied-lmhead"), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    _, untying = _untie(fixture_root, "llama-tied-lmhead", base)
    assert not untying.aliases
    with pytest.raises(IncompatibleAdapterError, match="module 'lm_head' has no 2-D weight"):
        build_plan([load_adapter(adapter_dir(fixture_root, "llama-tied-lmhead"))], untying.index.tensors)


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
