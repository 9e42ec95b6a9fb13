"""Helpers shared by the tests: fixture paths, and PEFT as the reference."""

from __future__ import annotations

import json
import signal
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from fixtures.build import ADAPTERS, BASES


def base_dir(root: Path, adapter: str) -> Path:
    return root / "bases" / ADAPTERS[adapter].base


def adapter_dir(root: Path, adapter: str) -> Path:
    return root / "adapters" / adapter


def load_base(path: Path, dtype: torch.dtype | str = "auto") -> torch.nn.Module:
    """The base model as transformers loads it, eval mode, no KV cache."""
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    return model.eval()


def load_peft(base: Path, adapters: Sequence[Path], dtype: torch.dtype | str = "auto") -> torch.nn.Module:
    """PEFT's unmerged VeRA model with every adapter active: the reference everything is checked against."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base, dtype), adapters[0], adapter_name="a0")
        for i, path in enumerate(adapters[1:], start=1):
            model.load_adapter(path, adapter_name=f"a{i}")
        model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return model.eval()


def sample_inputs(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


ALL_ADAPTERS = list(ADAPTERS)
# Adapters whose trained copy of a tied tensor a checkpoint cannot hold: merged in memory, refused on disk.
TIED_COPIES = ["llama-tied-embed"]
MERGEABLE_ADAPTERS = [name for name in ADAPTERS if name not in TIED_COPIES]
ALL_BASES = list(BASES)


def restore_sigint() -> None:
    """For subprocesses (`preexec_fn`): Ctrl-C back to its default, so Python turns it into KeyboardInterrupt even
    where the suite was started with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
