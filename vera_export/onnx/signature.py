"""What an exported graph takes and returns, as values: tasks, inputs with their example values and dynamic axes,
outputs, the dtype it computes in, and the names of its VeRA inputs.

Adding an input (a KV cache) or another compute dtype is a new value here, not a branch in the exporter, the
verifier and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..options import ONNX_PRECISIONS, ONNX_TASKS

if TYPE_CHECKING:
    from ..adapter import VeraAdapter

# Sizes of the example inputs the graph is traced with, by axis name. No axis is 1, which the exporter would
# specialize instead of keeping dynamic.
EXAMPLE_SIZES = {"batch": 2, "sequence": 8}

# The shared projections, stored once in every graph that keeps the adapter unmerged.
VERA_A, VERA_B = "vera.vera_A", "vera.vera_B"
# The symbolic leading axis of a bank graph's tables, as declared in the graph and recorded in the manifest.
ADAPTERS_AXIS = "adapters"
ADAPTER_INDEX = "adapter_index"


def lambda_input(module: str, kind: str) -> str:
    """Graph input holding one layer's `lambda_b` or `lambda_d` (`kind` is `"b"` or `"d"`)."""
    return f"vera.{module}.lambda_{kind}"


def tensor_input(name: str) -> str:
    """Graph input holding a trained tensor that replaces the base tensor `name` (a bias, a head)."""
    return f"vera.{name}"


@dataclass(frozen=True)
class Task:
    """What a graph computes from a model.

    Attributes:
        name: The task's name (`--task`).
        output: The model output the graph returns.
        suffixes: Architecture class names (`config.json`'s `architectures`) that do this task.
        base_model: The graph runs the model's `base_model` (its body without a head).
        generation: The export is a package ONNX Runtime GenAI generates from (a decoder with a KV cache, written
            by its model builder; see `generation`), not one traced forward pass.
    """

    name: str
    output: str
    suffixes: tuple[str, ...]
    base_model: bool = False
    generation: bool = False


TASKS = {
    task.name: task
    for task in (
        Task("causal-lm", "logits", ("ForCausalLM", "LMHeadModel")),
        Task("sequence-classification", "logits", ("ForSequenceClassification",)),
        # Any architecture has a body: feature extraction runs any model's base model.
        Task("feature-extraction", "last_hidden_state", ("Model",), base_model=True),
        Task("text-generation", "logits", ("ForCausalLM",), generation=True),
    )
}
assert tuple(TASKS) == ONNX_TASKS


@dataclass(frozen=True)
class Precision:
    """What a graph computes in.

    Attributes:
        name: As `--precision` spells it (and the GenAI model builder takes it).
        dtype: The dtype of weights (those not quantized), activations, KV cache and the VeRA branch.
        quantized: The base's projection weights are int4 (`MatMulNBits`): text-generation packages only.
    """

    name: str
    dtype: torch.dtype
    quantized: bool = False


PRECISIONS = {
    p.name: p
    for p in (
        Precision("fp32", torch.float32),
        Precision("fp16", torch.float16),
        Precision("int4", torch.float32, True),
    )
}
assert tuple(PRECISIONS) == ONNX_PRECISIONS


@dataclass(frozen=True)
class GraphInput:
    """One input of a graph.

    Attributes:
        name: Its name in the graph (and the traced module's `forward` argument).
        dtype: Its element type.
        axes: Its axes' symbolic names; every one is dynamic.
        fill: The value of the example it is traced with.
    """

    name: str
    dtype: torch.dtype
    axes: tuple[str, ...]
    fill: int = 1

    def example(self) -> torch.Tensor:
        return torch.full(tuple(EXAMPLE_SIZES[a] for a in self.axes), self.fill, dtype=self.dtype)

    def ort_type(self) -> str:
        """How ONNX Runtime names its type (`tensor(int64)`, `tensor(float)`, `tensor(float16)`)."""
        name = str(self.dtype).removeprefix("torch.")
        return f"tensor({ {'float32': 'float', 'float64': 'double'}.get(name, name) })"


TOKENS = (
    GraphInput("input_ids", torch.int64, ("batch", "sequence")),
    GraphInput("attention_mask", torch.int64, ("batch", "sequence")),
)


@dataclass(frozen=True)
class Signature:
    """A graph's inputs and outputs, and the dtype it computes in.

    Attributes:
        inputs: In order; the traced module's `forward` takes them by these names.
        outputs: The graph's outputs, in order.
        dtype: The floating point dtype of its weights and computation.
    """

    inputs: tuple[GraphInput, ...]
    outputs: tuple[str, ...]
    dtype: torch.dtype = torch.float32

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def examples(self) -> tuple[torch.Tensor, ...]:
        return tuple(i.example() for i in self.inputs)

    def dynamic_shapes(self) -> dict[str, dict[int, str]]:
        return {i.name: dict(enumerate(i.axes)) for i in self.inputs}

    @property
    def roundoff(self) -> float:
        """The unit roundoff of `dtype`."""
        return torch.finfo(self.dtype).eps / 2


def token_signature(task: Task, dtype: torch.dtype, extra: tuple[GraphInput, ...] = ()) -> Signature:
    """`input_ids`, `attention_mask` and `extra` in; the task's output out; computing in `dtype`."""
    return Signature((*TOKENS, *extra), (task.output,), dtype)


def trained_inputs(adapter: VeraAdapter) -> dict[str, torch.Tensor]:
    """The adapter's trained tensors by the name of the graph input that holds them."""
    tensors = {lambda_input(m, "b"): layer.lambda_b for m, layer in adapter.layers.items()}
    tensors |= {lambda_input(m, "d"): layer.lambda_d for m, layer in adapter.layers.items()}
    tensors |= {tensor_input(name): t for name, t in adapter.replacements.items()}
    return tensors


def kv_cache_signature(layers: int, dtype: torch.dtype, position_ids: bool = False) -> Signature:
    """The decoder signature of ONNX Runtime GenAI packages: tokens, mask (over past and new positions), optional
    `position_ids`, and a key and a value cache per layer in; logits and the updated caches out."""
    tokens = [
        GraphInput("input_ids", torch.int64, ("batch", "sequence")),
        GraphInput("attention_mask", torch.int64, ("batch", "total_sequence")),
    ]
    if position_ids:
        tokens.append(GraphInput("position_ids", torch.int64, ("batch", "sequence")))
    cache_axes = ("batch", "kv_heads", "past_sequence", "head_size")
    past = [
        GraphInput(f"past_key_values.{i}.{kind}", dtype, cache_axes)
        for i in range(layers)
        for kind in ("key", "value")
    ]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return Signature((*tokens, *past), ("logits", *present), dtype)
