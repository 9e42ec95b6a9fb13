"""The VeRA branch added to builder graphs: its nodes, and its outputs in plain ONNX Runtime against PEFT."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from tests.helpers import load_peft
from tests.onnx.helpers import Packages
from vera_export.errors import CheckpointError
from vera_export.onnx.manifest import Manifest
from vera_export.onnx.signature import VERA_A, VERA_B
from vera_export.onnx.surgery import find_pieces
from vera_export.targets import TargetLayer

TOKENS = [1, 40, 7, 99, 12, 5]


def _prefill(directory, feeds_extra=None) -> np.ndarray:
    """The package's logits for `TOKENS` with an empty KV cache, in an ONNX Runtime session."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([TOKENS]), "attention_mask": np.ones((1, len(TOKENS)), dtype=np.int64)}
    decoder = json.loads((directory / "genai_config.json").read_text())["model"]["decoder"]
    empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=np.float32)
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = empty
    return session.run(["logits"], {**feeds, **(feeds_extra or {})})[0][0]


@pytest.mark.parametrize("key", [("llama-gen-qv", "adapter", "fp32"), ("phi3-packed", "adapter", "fp32")])
def test_branch_computes_peft_s_forward(packages: Packages, key) -> None:
    """q and v inside Llama's packed q/k/v, and Phi-3's packed modules split over two projections."""
    package = packages[key]
    with torch.no_grad():
        want = (
            load_peft(package.base, [package.adapter], torch.float32)(torch.tensor([TOKENS]))
            .logits[0]
            .numpy()
        )
    got = _prefill(package.directory)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    # Zero lambdas are the base model: the branch is all there is of the adapter.
    manifest = Manifest.read(package.directory)
    zeros = {name: np.zeros(spec["shape"], dtype=np.float32) for name, spec in manifest.overridable.items()}
    with torch.no_grad():
        from tests.helpers import load_base

        bare = load_base(package.base, torch.float32)(torch.tensor([TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(_prefill(package.directory, zeros), bare, atol=2e-6, rtol=1e-5)
    assert np.abs(want - bare).max() > 1e-3


def test_projections_are_stored_once_and_the_down_product_shared(packages: Packages) -> None:
    graph = ir.load(packages["llama-gen-all", "adapter", "fp32"].directory / "model.onnx").graph
    initializers = graph.initializers
    assert VERA_A in initializers and VERA_B in initializers
    assert not [
        n for n in initializers if n.startswith("vera.") and n not in (VERA_A, VERA_B) and "lambda" not in n
    ]
    # One x @ A_s^T per projection input: q, k and v read the same one, as gate and up do.
    downs = [n for n in graph if n.name.endswith("/vera/MatMul_A")]
    assert len(downs) == 2 * 4  # per layer: attention input, o_proj's, MLP input, down_proj's
    slices = [n for n in graph if n.op_type == "Slice" and n.inputs[0].name in (VERA_A, VERA_B)]
    # A sliced at the two input sizes (64, 96), B at the three output sizes (64; 32 for k and v; 96): once each.
    assert len(slices) == 2 + 3


def test_an_unknown_module_is_refused_by_name(packages: Packages) -> None:
    graph = ir.load(packages["llama-gen-qv", "merged", "fp32"].directory / "model.onnx").graph
    layer = TargetLayer("model.layers.0.self_attn.rotary_proj", "w", (64, 64), 64, 64, False)
    with pytest.raises(CheckpointError, match="rotary_proj"):
        find_pieces(graph, {layer.module: layer}, {})
