"""`export_onnx`: every mode and task exported, run in ONNX Runtime and held to PEFT's unmerged model; every
refusal before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import adapter_dir, base_dir
from tests.onnx.helpers import (
    EXPORT_SPECS,
    assert_matches,
    peft_outputs,
    run_graph,
    token_batches,
    vocab_size,
)
from vera_export import AdapterError, CheckpointError, IncompatibleAdapterError, OnnxOptions, OutputError
from vera_export.onnx.export import export_onnx, resolve_task
from vera_export.onnx.manifest import MANIFEST_NAME, Manifest


@pytest.mark.parametrize("key", EXPORT_SPECS)
def test_graph_matches_peft(exports, key: str) -> None:
    export = exports[key]
    batches = token_batches(vocab_size(export))
    got = run_graph(export, batches)
    assert_matches(got, peft_outputs(export, None, batches), batches)
    # The check can fail: the base model alone is more than a thousand tolerances away.
    base_only = peft_outputs(export, [], batches)
    assert max(np.abs(g - b).max() for g, b in zip(got, base_only)) > 1e-2


@pytest.mark.parametrize("key", EXPORT_SPECS)
def test_export_verified_itself(exports, key: str) -> None:
    verification = exports[key].report.verification
    assert verification is not None and verification.passed, [c.line() for c in verification.checks]
    outputs = [c for c in verification.checks if c.name.startswith("onnx ")]
    assert len(outputs) == 2 and all(c.max_abs_error <= c.tolerance < 1e-5 for c in outputs)


@pytest.mark.parametrize("key", EXPORT_SPECS)
def test_graph_interface(exports, key: str) -> None:
    export = exports[key]
    path = export.directory / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert [(o.domain, o.version) for o in model.opset_import if o.domain == ""] == [("", export.spec.opset)]
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    assert [i.name for i in inputs] == ["input_ids", "attention_mask"]
    for value in inputs:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"]
    output = "last_hidden_state" if export.spec.task == "feature-extraction" else "logits"
    assert [o.name for o in graph.output] == [output]
    files = {p.name for p in export.directory.iterdir()}
    assert {"model.onnx", MANIFEST_NAME, "config.json"} <= files
    assert ("model.onnx.data" in files) == bool(export.spec.external_data)
    assert not any(name.endswith(".safetensors") for name in files)


def test_refusals_before_any_export(fixture_root, tmp_path) -> None:
    base, qv = base_dir(fixture_root, "llama-qv"), adapter_dir(fixture_root, "llama-qv")
    qkv = adapter_dir(fixture_root, "llama-qkv-b")
    with pytest.raises(AdapterError, match="exactly one adapter"):
        export_onnx(base, [qv, qkv], tmp_path / "a", OnnxOptions(mode="adapter"))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM is not a sequence-classification model"):
        export_onnx(base, [qv], tmp_path / "b", OnnxOptions(task="sequence-classification"))
    with pytest.raises(IncompatibleAdapterError, match="has no 2-D weight"):
        export_onnx(base, [adapter_dir(fixture_root, "gpt2-attn")], tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("")
    with pytest.raises(OutputError, match="not empty"):
        export_onnx(base, [qv], tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # nothing partial left behind
    for bad in ({"mode": "lora"}, {"task": "translation"}, {"opset": 17}, {"opset": 24}):
        with pytest.raises(ValueError):
            OnnxOptions(**bad)


@pytest.mark.parametrize(
    ("fixture", "task"),
    [("llama-qv", "causal-lm"), ("gpt2-attn", "causal-lm"), ("bert-cls", "sequence-classification")],
)
def test_task_from_architecture(fixture_root, fixture: str, task: str) -> None:
    assert resolve_task(base_dir(fixture_root, fixture), "auto").name == task
    assert resolve_task(base_dir(fixture_root, fixture), "feature-extraction").name == "feature-extraction"


def test_a_task_auto_cannot_tell_is_asked_for(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForQuestionAnswering"]}))
    with pytest.raises(
        CheckpointError, match=r"cannot tell the task of BertForQuestionAnswering; pass --task"
    ):
        resolve_task(tmp_path, "auto")
    assert resolve_task(tmp_path, "feature-extraction").name == "feature-extraction"  # any model has a body
    with pytest.raises(CheckpointError, match="BertForQuestionAnswering is not a causal-lm model"):
        resolve_task(tmp_path, "causal-lm")


def test_the_report_says_what_was_written(exports) -> None:
    report = exports["gpt2-adapter"].report
    assert (report.mode, report.task, report.ok) == ("adapter", "causal-lm", True)
    assert {"model.onnx", "model.onnx.data", MANIFEST_NAME, "config.json"} <= set(report.files)
    assert report.overridable == len(Manifest.read(report.output).overridable) > 0
    first, *rest = report.text().splitlines()
    assert first.startswith(
        f"exported causal-lm graph (adapter mode, {report.overridable} overridable tensors)"
    )
    assert rest[-1].startswith("verification PASSED") and report.text(quiet=True).splitlines()[1:] == [
        rest[-1]
    ]
    merged = exports["gpt2-merged"].report
    assert merged.overridable == 0 and "0 overridable tensors" in merged.text()


@pytest.mark.parametrize("mode", ["merged", "adapter", "bank"])
def test_float16_graphs_in_every_mode(fixture_root, tmp_path: Path, mode: str) -> None:
    """--precision fp16 without a KV cache: float16 weights and outputs, the VeRA branch's lambdas in float32 as PEFT
    holds them, verified against float16's roundoff; and the graph is PEFT's function, within float16's."""
    name = "llama-qv"
    base, adapter = base_dir(fixture_root, name), adapter_dir(fixture_root, name)
    options = OnnxOptions(mode=mode, precision="fp16", progress=False)
    report = export_onnx(base, [adapter], tmp_path / "graph", options)
    assert report.ok, report.text()
    manifest = Manifest.read(tmp_path / "graph")
    assert manifest.precision == "fp16"
    assert all(spec["dtype"] == "float32" for spec in manifest.overridable.values())
    model = onnx.load(str(tmp_path / "graph" / "model.onnx"))
    # Every matrix is float16 but VeRA's own (the shared projections, a bank's lambda tables): float32, as PEFT.
    matrices = {t.name: t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    float32 = {name for name, kind in matrices.items() if kind == onnx.TensorProto.FLOAT}
    assert len(matrices) > 8 and all(name.startswith("vera.") for name in float32)
    assert ({"vera.vera_A", "vera.vera_B"} <= float32) == (mode != "merged")
    assert all(kind == onnx.TensorProto.FLOAT16 for name, kind in matrices.items() if name not in float32)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
