"""Verification of a text-generation package: its weights bit for bit, and greedy decoding in ONNX Runtime GenAI,
step by step, against the unmerged VeRA model.

- The decoder's inputs and outputs are GenAI's KV-cache signature, its overridable inputs and projections the
  manifest's; its projection weights and lambdas exactly what they must be (`package_weights`).
- From fixed prompts GenAI decodes `NEW_TOKENS` tokens greedily with its KV cache (the end-of-sequence token held
  back); the logits of every step are compared with the base model plus the adapters unmerged
  (`layers.apply_vera`) in float64, fed the same tokens, all positions in one forward pass. The tolerance is
  `PRECISION_FACTOR` times PyTorch's own error in the package's precision on the same tokens (float32, or float16
  for fp16 packages) plus `FLOOR_ROUNDOFFS` roundoffs of the largest logit, as for the other graphs.
- int4: the kernels quantize activations to int8 per block, so the graph is not "int4 weights times float
  activations", and a reference of that would fail on the rounding of activations near a step, more often the
  larger the model. So a copy of the graph computing with float activations (accuracy level 1) is decoded against
  the model with the graph's own dequantized weights (`quantized`), which keeps the check as tight as in float32;
  the shipped graph's deviation from it, and the int4 error against the float model, are reported, not gated.
- In adapter mode, the same again with a second adapter (the exported one with `lambda_b` negated) written as an
  adapter file and applied through `og.Adapters`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from ..adapter import VeraAdapter, VeraLayer
from ..checks import Check
from ..layers import apply_vera, merge_into, untie
from ..model_check import cast_adapter
from ..modeling import load_model, model_config
from .adapter_file import adapter_values, write_adapter_file
from .generation import genai_inputs
from .graph import MODEL_NAME
from .manifest import MANIFEST_NAME, Manifest, projection_digest
from .package_weights import check_weights
from .quantized import dequantized_weights
from .signature import PRECISIONS, VERA_A, VERA_B, Precision, kv_cache_signature

NEW_TOKENS = 16
PROMPT_LENGTHS = (5, 11)
PRECISION_FACTOR = 4.0
FLOOR_ROUNDOFFS = 16.0


@dataclasses.dataclass
class Decoded:
    """One greedy decoding: the prompt, the tokens chosen, and the logits of every step (`[steps, vocab]`)."""

    prompt: list[int]
    tokens: list[int]
    logits: np.ndarray

    @property
    def fed(self) -> torch.Tensor:
        """What the model read: the prompt and every chosen token but the last."""
        return torch.tensor([self.prompt + self.tokens[:-1]])


def verify_generation(
    onnx_dir: Path, base: Path, adapters: list[VeraAdapter], manifest: Manifest
) -> list[Check]:
    """Every check of a text-generation package (see the module docstring).

    Args:
        onnx_dir: The package.
        base: The base model directory.
        adapters: The adapters exported, their projections pinned.
        manifest: The package's `vera_export.json`.
    """
    import onnxruntime_genai as og

    precision = PRECISIONS[manifest.precision]
    shapes = {name: tuple(shape) for name, (_, shape) in manifest.base_tensors.items()}
    try:
        graph = ir.load(onnx_dir / MODEL_NAME)
        checks = [_check_graph(onnx_dir, graph, manifest, precision)]
        checks.append(check_weights(graph, base, adapters, manifest, precision))
        weights = dequantized_weights(graph.graph, shapes) if precision.quantized else {}
    except (OSError, ValueError) as exc:  # a graph or weights file that cannot be read
        return [Check("package loads", 0.0, 0.0, 0.0, False, f"{type(exc).__name__}: {str(exc)[:300]}")]
    del graph
    merged = manifest.mode == "merged"
    prompts = _prompts(model_config(base).vocab_size)
    runs = [("exported", adapters)]
    if manifest.mode == "adapter":
        runs.append(("second adapter, from a file", [_negated(adapters[0])]))
    with tempfile.TemporaryDirectory(prefix="vera-export-verify-") as scratch:
        scratch = Path(scratch)
        # int4: the checked graph computes with float activations (see the module docstring); the shipped one too.
        checked = _float_activations(onnx_dir, scratch / "float-activations") if weights else onnx_dir
        try:
            models = {"checked": og.Model(str(checked))}
            if weights:
                models["shipped"] = og.Model(str(onnx_dir))
        except RuntimeError as exc:  # what GenAI raises for a package it cannot load
            reason = (str(exc).strip().splitlines() or ["no reason given"])[0]
            return [*checks, Check("package loads in ONNX Runtime GenAI", 0.0, 0.0, 0.0, False, reason[:300])]
        for label, run in runs:
            file = None
            if label != "exported":
                file = scratch / "second.onnx_adapter"
                write_adapter_file(adapter_values(manifest, run), file)
            decoded = [_decode(og, models["checked"], prompt, file) for prompt in prompts]
            exact = _reference(base, run, torch.float64, weights, merged, decoded)
            single = _reference(base, run, precision.dtype, weights, merged, decoded)
            notes = [""] * len(decoded)
            if weights:
                floats = _reference(base, run, torch.float64, {}, False, decoded)
                shipped = [
                    _decode(og, models["shipped"], prompt, file, item.tokens)
                    for prompt, item in zip(prompts, decoded)
                ]
                notes = [
                    f"; as shipped (int8 activations): off by {_max_abs(s.logits, e):.3g}; int4 against the float "
                    f"model: {_max_abs(s.logits, f):.3g} (not gated)"
                    for s, e, f in zip(shipped, exact, floats)
                ]
            for k, item in enumerate(decoded):
                name = (
                    f"genai {precision.name} logits, {label}, prompt {k + 1} "
                    f"({len(item.prompt)} tokens, {len(item.tokens)} new)"
                )
                checks.append(_check_logits(name, item.logits, exact[k], single[k], precision, notes[k]))
        del models
    return checks


def _prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(4, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def _float_activations(onnx_dir: Path, out: Path) -> Path:
    """A copy of the package whose `MatMulNBits` nodes compute with float activations (accuracy level 1) instead
    of int8 ones."""
    out.mkdir()
    model = onnx.load(str(onnx_dir / MODEL_NAME), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 1
    onnx.save(model, str(out / MODEL_NAME))
    for path in onnx_dir.iterdir():
        # Copies: ONNX Runtime refuses links that lead out of the model's folder, onnx_ir files with two names.
        if path.name != MODEL_NAME:
            shutil.copy2(path, out / path.name)
    return out


def _decode(
    og, model, prompt: list[int], adapter_file: Path | None, forced: list[int] | None = None
) -> Decoded:
    """Greedy decoding of `NEW_TOKENS` tokens, the end-of-sequence token ignored, recording every step's logits;
    with `forced`, those tokens are fed instead of the chosen ones (to compare two graphs on the same tokens)."""
    params = og.GeneratorParams(model)
    length = len(prompt) + NEW_TOKENS
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "second")
        generator.set_active_adapter(adapters, "second")  # before the prompt: it applies from the next run on
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    logits, tokens = [], []
    while not generator.is_done() and len(tokens) < NEW_TOKENS:
        logits.append(np.array(generator.get_logits(), dtype=np.float64).reshape(-1))
        if forced is None:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        else:
            tokens.append(forced[len(tokens)])
            if len(tokens) < len(forced):
                generator.append_tokens(np.array([tokens[-1]], dtype=np.int32))
    return Decoded(prompt, tokens, np.stack(logits))


@torch.no_grad()
def _reference(
    base: Path,
    adapters: list[VeraAdapter],
    dtype: torch.dtype,
    weights: dict[str, torch.Tensor],
    merged: bool,
    decoded: list[Decoded],
) -> list[np.ndarray]:
    """Each decoding's logits from the reference model in `dtype`, one forward pass over the tokens it was fed.

    The reference is the base with the adapters unmerged; with `weights` (an int4 graph's, dequantized), those
    replace the projection weights, which in a merged package hold the adapters already (then merged in too,
    for the tensors they replace).
    """
    model = load_model(base, dtype)
    # The adapters' saved copies of base weights were checked against the base when they were resolved; here a
    # quantized head holds the graph's dequantized weights instead, which no copy equals.
    adapters = [dataclasses.replace(cast_adapter(a, dtype), base_copies={}) for a in adapters]
    if weights:
        if merged:
            model = merge_into(model, adapters)
        untie(model, weights)  # a quantized head is no longer the (float) input embedding
        state = model.state_dict(keep_vars=True)
        for name, weight in weights.items():
            state[name].data.copy_(weight.to(dtype))
    if not (weights and merged):
        model = apply_vera(model, adapters)
    outputs = []
    for item in decoded:
        logits = model(input_ids=item.fed).logits[0, len(item.prompt) - 1 :]
        outputs.append(logits.double().numpy())
    return outputs


def _check_logits(
    name: str, got: np.ndarray, want: np.ndarray, same_precision: np.ndarray, precision: Precision, note: str
) -> Check:
    error = float(np.abs(got - want).max())
    torch_error = float(np.abs(same_precision - want).max())
    scale = float(np.abs(want).max()) or 1.0
    roundoff = torch.finfo(precision.dtype).eps / 2
    tolerance = PRECISION_FACTOR * torch_error + FLOOR_ROUNDOFFS * roundoff * scale
    detail = f"PyTorch {str(precision.dtype).removeprefix('torch.')} is off by {torch_error:.3g}{note}"
    return Check(name, error, error / scale, tolerance, bool(error <= tolerance), detail)


def _negated(adapter: VeraAdapter) -> VeraAdapter:
    """The adapter with every `lambda_b` negated: the same layers and projections, the opposite delta."""
    layers = {m: VeraLayer(m, -layer.lambda_b, layer.lambda_d) for m, layer in adapter.layers.items()}
    return dataclasses.replace(adapter, layers=layers)


def ir_dtype(value: ir.Value) -> torch.dtype | None:
    """A graph value's element type as a torch dtype."""
    return None if value.dtype is None else getattr(torch, value.dtype.numpy().name, None)


def _check_graph(onnx_dir: Path, graph: ir.Model, manifest: Manifest, precision: Precision) -> Check:
    """The decoder's inputs and outputs are GenAI's, its overridable inputs the manifest's, its projections the
    recorded ones."""
    inputs = {v.name: v for v in graph.graph.inputs}
    initialized = set(graph.graph.initializers)
    layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    signature = kv_cache_signature(layers, precision.dtype, position_ids="position_ids" in inputs)
    problems = []
    # GenAI binds inputs and outputs by name: their order is the builder's (every key cache, then every value).
    expected = {i.name: (i.dtype, len(i.axes)) for i in signature.inputs}
    found = {name: (ir_dtype(v), len(v.shape)) for name, v in inputs.items() if name not in initialized}
    if found != expected:
        differ = sorted(
            name for name in found.keys() | expected.keys() if found.get(name) != expected.get(name)
        )
        problems.append(f"inputs differ from GenAI's decoder signature: {', '.join(differ[:6])}")
    missing = [name for name in genai_inputs(onnx_dir) if "%d" not in name and name not in inputs]
    if missing:
        problems.append(f"genai_config.json names inputs the graph lacks: {', '.join(missing)}")
    outputs = sorted(v.name for v in graph.graph.outputs)
    if outputs != sorted(signature.outputs):
        differ = sorted(set(outputs) ^ set(signature.outputs))
        problems.append(f"outputs differ from GenAI's decoder signature: {', '.join(differ[:6])}")
    overridable = {name: list(inputs[name].shape) for name in inputs if name in initialized}
    recorded = {name: spec["shape"] for name, spec in manifest.overridable.items()}
    if overridable != recorded:
        problems.append(f"overridable inputs differ from {MANIFEST_NAME}'s")
    if manifest.projections is not None:
        initializers = graph.graph.initializers
        if VERA_A not in initializers or VERA_B not in initializers:
            problems.append(f"the graph holds no {VERA_A} / {VERA_B}")
        else:
            values = [torch.from_numpy(initializers[n].const_value.numpy().copy()) for n in (VERA_A, VERA_B)]
            if projection_digest(*values) != manifest.projections["graph_sha256"]:
                problems.append(f"{VERA_A} / {VERA_B} differ from the projections the manifest records")
    return Check(
        "decoder inputs, outputs, KV cache and overridable tensors",
        0.0,
        0.0,
        0.0,
        not problems,
        detail="; ".join(problems) or f"{layers} layers, {len(overridable)} overridable",
    )
