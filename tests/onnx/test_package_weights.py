"""The exact weight check of text-generation packages catches what decoding's tolerance may not."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tests.onnx.helpers import Packages
from vera_export import load_adapter
from vera_export.io.index import ShardedTensorIndex
from vera_export.onnx.manifest import Manifest
from vera_export.onnx.modes import MODES
from vera_export.onnx.package_weights import check_weights
from vera_export.onnx.signature import PRECISIONS
from vera_export.options import Rounding


def _check(package, graph: ir.Model):
    manifest = Manifest.read(package.directory)
    adapters = (
        MODES[package.mode]
        .resolve(ShardedTensorIndex.from_dir(package.base), [load_adapter(package.adapter)], Rounding.FMA)
        .adapters
    )
    return check_weights(graph, package.base, adapters, manifest, PRECISIONS[package.precision])


@pytest.mark.parametrize(
    "key",
    [
        ("llama-gen-qv", "merged", "fp32"),
        ("llama-gen-all", "adapter", "fp16"),
        ("phi3-packed", "merged", "int4"),
    ],
)
def test_the_exported_weights_are_exact(packages: Packages, key) -> None:
    package = packages[key]
    check = _check(package, ir.load(package.directory / "model.onnx"))
    assert check.passed and int(check.detail.split()[0]) > 0, check.detail


def test_one_changed_weight_element_is_named(packages: Packages) -> None:
    package = packages["llama-gen-qv", "merged", "fp32"]
    graph = ir.load(package.directory / "model.onnx")
    node = next(n for n in graph.graph if n.name == "/model/layers.1/attn/qkv_proj/MatMul")
    weight = node.inputs[1]
    values = weight.const_value.numpy().copy()
    values[3, 70] = np.nextafter(values[3, 70], np.float32(1))  # one ulp, in v_proj's columns
    weight.const_value = ir.tensor(values, name=weight.name)
    check = _check(package, graph)
    assert not check.passed and "/model/layers.1/attn/qkv_proj" in check.detail


def test_a_changed_lambda_default_is_named(packages: Packages) -> None:
    package = packages["llama-gen-qv", "adapter", "fp32"]
    graph = ir.load(package.directory / "model.onnx")
    name = "vera.model.layers.0.self_attn.q_proj.lambda_d"
    value = graph.graph.initializers[name]
    value.const_value = ir.tensor(value.const_value.numpy() * np.float32(1.01), name=name)
    check = _check(package, graph)
    assert not check.passed and name in check.detail
