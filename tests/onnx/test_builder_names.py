"""The model builder's names of a decoder's projections, read off real builder graphs."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from tests.onnx.helpers import Packages
from vera_export.onnx.builder_names import pieces, slots, split_module, split_stem, width
from vera_export.onnx.manifest import Manifest


def _graph(packages: Packages, key: tuple[str, str, str]) -> tuple[dict, dict]:
    package = packages[key]
    manifest = Manifest.read(package.directory)
    shapes = {name: tuple(shape) for name, (_, shape) in manifest.base_tensors.items()}
    graph = ir.load(package.directory / "model.onnx").graph
    return {value.name: value for node in graph for value in node.outputs}, shapes


def test_module_and_stem_names_map_both_ways() -> None:
    assert split_module("model.layers.3.self_attn.q_proj") == (
        "model.layers.3.self_attn.",
        "/model/layers.3/attn",
        "q_proj",
    )
    assert split_module("model.layers.3.mlp.down_proj")[1:] == ("/model/layers.3/mlp", "down_proj")
    assert split_module("lm_head") == ("", "", "lm_head") and split_module("model.embed_tokens") is None
    assert split_stem("/model/layers.3/attn/qkv_proj") == ("model.layers.3.self_attn.", "qkv_proj")
    assert split_stem("/lm_head") == ("", "lm_head") and split_stem("/model/embed_tokens/Gather") is None


def test_llama_q_k_v_are_columns_of_one_packed_projection(packages: Packages) -> None:
    values, shapes = _graph(packages, ("llama-gen-qv", "merged", "fp32"))
    q = pieces(values, "model.layers.0.self_attn.q_proj", 64, shapes)
    v = pieces(values, "model.layers.0.self_attn.v_proj", 32, shapes)
    assert q[0].output is v[0].output and q[0].output.name == "/model/layers.0/attn/qkv_proj/MatMul/output_0"
    assert (q[0].offset, v[0].offset, width(q[0].output)) == (0, 64 + 32, 128)
    found = slots(values, "/model/layers.0/attn/qkv_proj", shapes)
    assert [(s.parameter.split(".")[-2], s.columns) for s in found] == [
        ("q_proj", slice(0, 64)),
        ("k_proj", slice(64, 96)),
        ("v_proj", slice(96, 128)),
    ]


def test_phi3s_packed_gate_up_is_split_by_the_builder(packages: Packages) -> None:
    values, shapes = _graph(packages, ("phi3-packed", "adapter", "fp32"))
    found = pieces(values, "model.layers.1.mlp.gate_up_proj", 192, shapes)
    assert [(p.output.name.split("/")[-3], p.start, p.width, p.offset) for p in found] == [
        ("gate_proj", 0, 96, 0),
        ("up_proj", 96, 96, 0),
    ]
    up = slots(values, "/model/layers.1/mlp/up_proj", shapes)
    assert [(s.parameter, s.rows) for s in up] == [("model.layers.1.mlp.gate_up_proj.weight", slice(96, 192))]


def test_the_head_is_the_graph_s_logits(packages: Packages) -> None:
    """The builder's `/lm_head/MatMul` writes the graph output `logits` directly, tied to the embedding or not."""
    for key in (("llama-gen-qv", "merged", "fp32"), ("llama-gen-tied-head", "adapter", "int4")):
        values, shapes = _graph(packages, key)
        (piece,) = pieces(values, "lm_head", 256, shapes)
        assert piece.output.producer().name.startswith("/lm_head/MatMul") and width(piece.output) == 256


@pytest.mark.parametrize(
    "module", ["model.layers.0.self_attn.rotary", "model.layers.9.self_attn.q_proj", "lm_head"]
)
def test_what_the_naming_does_not_lead_to_is_none(packages: Packages, module: str) -> None:
    values, shapes = _graph(packages, ("llama-gen-qv", "merged", "fp32"))
    assert pieces(values, module, 64, shapes) is None
