"""Regenerated projections are bit-identical to torch's generator and to PEFT's, without using either."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from peft.tuners.vera.model import _kaiming_init

from tests.helpers import ADAPTERS, adapter_dir, base_dir, load_peft
from vera_export.projections import Rounding, TorchCPUGenerator, generate_projections

SEEDS = [0, 1, 42, 1234, 2**31 - 1, 2**32 - 1, 2**32 + 5, 987654321987, 2**63 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_stream_matches_torch_generator(seed: int) -> None:
    ours = TorchCPUGenerator(seed)
    theirs = torch.Generator().manual_seed(seed)
    # Several draws from one stream, with different sizes and bounds, including empty ones.
    for shape, low, high in [
        ((7, 3), -1.0, 1.0),
        ((0,), 0.0, 1.0),
        ((1000,), -0.0123, 0.0123),
        ((33, 65), 2.5, 7.0),
    ]:
        expected = torch.empty(shape).uniform_(low, high, generator=theirs)
        assert torch.equal(ours.uniform(shape, low, high).view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 1])
@pytest.mark.parametrize(
    "r, max_in, max_out", [(1, 1, 1), (4, 64, 32), (16, 96, 64), (256, 2048, 5632), (3, 5, 1000)]
)
def test_projections_match_peft_kaiming_init(seed: int, r: int, max_in: int, max_out: int) -> None:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    peft_A = _kaiming_init((r, max_in), generator=generator)
    peft_B = _kaiming_init((max_out, r), generator=generator)
    vera_A, vera_B = generate_projections(seed, r, max_in, max_out)
    assert vera_A.dtype == vera_B.dtype == torch.float32
    assert torch.equal(vera_A, peft_A) and torch.equal(vera_B, peft_B)


def test_separate_rounding_matches_torch_without_avx2(tmp_path) -> None:
    """Torch's DEFAULT (pre-AVX2) CPU kernel rounds twice; Rounding.SEPARATE reproduces it, FMA does not."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(100)
    script = (
        "import sys, torch; g = torch.Generator().manual_seed(5);"
        f"torch.save(torch.empty(20000).uniform_(-{bound!r}, {bound!r}, generator=g), sys.argv[1])"
    )
    saved = tmp_path / "uniform.pt"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", script, str(saved)], check=True, env=env)
    expected = torch.load(saved)
    separate = TorchCPUGenerator(5, Rounding.SEPARATE).uniform((20000,), -bound, bound)
    fused = TorchCPUGenerator(5, Rounding.FMA).uniform((20000,), -bound, bound)
    assert torch.equal(separate, expected)
    assert not torch.equal(fused, expected)  # the two kernels really differ, so the option matters


@pytest.mark.parametrize(
    "name", [n for n, spec in ADAPTERS.items() if not spec.config.get("save_projection", True)]
)
def test_regenerated_projections_match_peft_loading(fixture_root, name: str) -> None:
    """PEFT regenerates projections sized by the targeted layers when it loads; so do we."""
    from vera_export.adapter import load_adapter
    from vera_export.io.index import ShardedTensorIndex
    from vera_export.names import model_names
    from vera_export.plan import build_plan

    adapter, base = load_adapter(adapter_dir(fixture_root, name)), base_dir(fixture_root, name)
    # A tied head counts too: its out_features (the vocabulary) size vera_B.
    index = model_names(base, ShardedTensorIndex.from_dir(base), [adapter]).index
    plan = build_plan([adapter], index.tensors)
    (projections,) = plan.projections.values()
    assert not projections.stored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = load_peft(base_dir(fixture_root, name), [adapter_dir(fixture_root, name)])
    assert torch.equal(projections.vera_A, peft_model.base_model.vera_A["a0"])
    assert torch.equal(projections.vera_B, peft_model.base_model.vera_B["a0"])
