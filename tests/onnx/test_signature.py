"""Graph signatures as values: inputs with their example values and dynamic axes, the task's output, ONNX Runtime's
names for their types, and the names of the VeRA inputs."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from tests.helpers import adapter_dir
from vera_export.adapter import load_adapter
from vera_export.onnx.signature import (
    EXAMPLE_SIZES,
    PRECISIONS,
    TASKS,
    TOKENS,
    GraphInput,
    Signature,
    kv_cache_signature,
    lambda_input,
    tensor_input,
    token_signature,
    trained_inputs,
)


def test_no_example_axis_is_1() -> None:
    """The exporter specializes an axis of size 1 instead of keeping it dynamic."""
    assert all(size > 1 for size in EXAMPLE_SIZES.values())


def test_an_input_s_example_has_its_axes_dtype_and_fill() -> None:
    index = GraphInput("adapter_index", torch.int64, ("batch",), fill=0)
    assert torch.equal(index.example(), torch.zeros(EXAMPLE_SIZES["batch"], dtype=torch.int64))
    (input_ids, _) = TOKENS
    example = input_ids.example()
    assert (
        example.shape == (EXAMPLE_SIZES["batch"], EXAMPLE_SIZES["sequence"]) and example.dtype == torch.int64
    )
    assert (example == 1).all()


@pytest.mark.parametrize(
    ("dtype", "proto"),
    [
        (torch.int64, onnx.TensorProto.INT64),
        (torch.float32, onnx.TensorProto.FLOAT),
        (torch.float16, onnx.TensorProto.FLOAT16),
        (torch.int32, onnx.TensorProto.INT32),
    ],
)
def test_ort_type_is_how_onnx_runtime_names_the_type(dtype: torch.dtype, proto: int) -> None:
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", proto, ["batch"])],
        [helper.make_tensor_value_info("y", proto, ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    runner = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert GraphInput("x", dtype, ("batch",)).ort_type() == runner.get_inputs()[0].type


def test_a_token_signature_takes_the_tokens_and_returns_the_task_s_output() -> None:
    extra = GraphInput("adapter_index", torch.int64, ("batch",), fill=0)
    signature = token_signature(TASKS["feature-extraction"], torch.float32, (extra,))
    assert signature.input_names == ["input_ids", "attention_mask", "adapter_index"]
    assert signature.outputs == ("last_hidden_state",) and signature.dtype == torch.float32
    assert signature.dynamic_shapes() == {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "adapter_index": {0: "batch"},
    }
    batch, sequence = EXAMPLE_SIZES["batch"], EXAMPLE_SIZES["sequence"]
    assert [tuple(e.shape) for e in signature.examples()] == [(batch, sequence), (batch, sequence), (batch,)]
    assert signature.roundoff == 2.0**-24
    assert Signature(TOKENS, ("logits",), torch.float16).roundoff == 2.0**-11


def test_tasks_say_what_the_graph_returns_and_of_which_models() -> None:
    assert {name: (t.output, t.base_model, t.generation) for name, t in TASKS.items()} == {
        "causal-lm": ("logits", False, False),
        "sequence-classification": ("logits", False, False),
        "feature-extraction": ("last_hidden_state", True, False),
        "text-generation": ("logits", False, True),
    }
    assert "LlamaForCausalLM".endswith(TASKS["causal-lm"].suffixes)
    assert "GPT2LMHeadModel".endswith(TASKS["causal-lm"].suffixes)
    assert "BertForSequenceClassification".endswith(TASKS["sequence-classification"].suffixes)


def test_trained_inputs_are_every_trained_tensor_by_its_input_name(fixture_root: Path) -> None:
    adapter = load_adapter(adapter_dir(fixture_root, "bert-cls"))
    inputs = trained_inputs(adapter)
    assert len(inputs) == 2 * len(adapter.layers) + len(adapter.replacements)
    for module, layer in adapter.layers.items():
        assert inputs[lambda_input(module, "b")] is layer.lambda_b
        assert inputs[lambda_input(module, "d")] is layer.lambda_d
    for name, tensor in adapter.replacements.items():
        assert inputs[tensor_input(name)] is tensor
    assert lambda_input("model.layers.0.q_proj", "d") == "vera.model.layers.0.q_proj.lambda_d"
    assert tensor_input("classifier.bias") == "vera.classifier.bias"


def test_the_kv_cache_signature_is_genai_s_decoder() -> None:
    signature = kv_cache_signature(2, torch.float16, position_ids=True)
    assert signature.input_names == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert signature.outputs == (
        "logits",
        "present.0.key",
        "present.0.value",
        "present.1.key",
        "present.1.value",
    )
    caches = [i for i in signature.inputs if i.name.startswith("past_")]
    assert all(i.dtype == torch.float16 and len(i.axes) == 4 for i in caches)
    assert "position_ids" not in kv_cache_signature(1, torch.float32).input_names


def test_precisions_say_what_a_graph_computes_in() -> None:
    assert {name: (p.dtype, p.quantized) for name, p in PRECISIONS.items()} == {
        "fp32": (torch.float32, False),
        "fp16": (torch.float16, False),
        "int4": (torch.float32, True),
    }
