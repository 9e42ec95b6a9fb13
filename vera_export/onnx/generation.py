"""`vera-export onnx --task text-generation`: a package ONNX Runtime GenAI loads and generates from, KV cache and all.

The path: the ONNX Runtime GenAI model builder (`onnxruntime_genai.models.builder`) writes the decoder, then
`surgery` adds the VeRA branch to its graph. The builder's graphs are what GenAI runs best: fused
`GroupQueryAttention` with rotary embedding and a KV cache shared between steps, int4 `MatMulNBits` kernels,
packed q/k/v projections, and the `genai_config.json` GenAI needs, for each architecture it knows. An exporter of
our own would have to rebuild all of that per architecture; the VeRA branch, in contrast, is the same few nodes
wherever a projection is, so it is added afterwards, by name, after the builder's int4 quantization (which would
quantize the branch too). Merged mode folds the adapters into the weights first (the 1-ulp fold, in the
precision's weight dtype) and hands the builder the merged checkpoint.

Precisions: fp32; fp16 (weights, activations, KV cache and the branch in float16); int4 (base weights as
`MatMulNBits`, block size 32, the builder's defaults, with activations and the VeRA branch in float32).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from ..errors import CheckpointError, IncompatibleAdapterError
from ..io.index import ShardedTensorIndex
from ..io.side_files import side_files
from ..layers import merge_into
from ..modeling import load_model, model_config
from ..targets import match_layers
from .graph import DATA_NAME, MODEL_NAME
from .manifest import Manifest, projection_digest, projection_fingerprint
from .modes import ExportMode, Resolution
from .signature import Precision
from .surgery import add_branches

GENAI_CONFIG_NAME = "genai_config.json"
STAGES = ("building", "adding VeRA", "writing")
# Architectures the tests run through the builder and GenAI, merged and unmerged; others are refused up front.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM")
INSTALL_HINT = "pip install 'vera-export[genai]' (or pip install onnxruntime-genai)"


def check(base: Path, mode: ExportMode, resolution: Resolution) -> None:
    """Refuse, before any work, what the package cannot be built from.

    Raises:
        CheckpointError: onnxruntime-genai is not installed, the architecture is not one the path serves, or the
            base has no tokenizer or end-of-sequence token.
        IncompatibleAdapterError: In adapter mode, an adapter that trains tensors besides its lambdas.
    """
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise CheckpointError(
            f"--task text-generation needs ONNX Runtime GenAI, which is not installed: {INSTALL_HINT}"
        )
    if mode.stacked:
        raise CheckpointError(
            "--task text-generation takes --mode merged or --mode adapter; bank mode is not offered"
        )
    config = model_config(base)
    architecture = (config.architectures or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"{base}: --task text-generation does not serve {architecture}; it serves {', '.join(ARCHITECTURES)} "
            f"(export another task, e.g. --task causal-lm, for a graph without a KV cache)"
        )
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    except Exception as exc:  # transformers raises many types for missing or broken tokenizer files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{base}: its tokenizer cannot be loaded ({reason}); a text-generation package needs the base's "
            f"tokenizer files (tokenizer.json and tokenizer_config.json)"
        ) from None
    if config.eos_token_id is None and tokenizer.eos_token_id is None:
        raise CheckpointError(
            f"{base}: neither config.json nor the tokenizer names an eos_token_id; generation needs one"
        )
    if mode.name == "adapter":
        trained = [name for adapter in resolution.adapters for name in adapter.replacements]
        if trained:
            raise IncompatibleAdapterError(
                f"the adapter trains {', '.join(trained[:5])} besides its lambdas; a text-generation package keeps "
                f"only lambdas swappable: export it with --mode merged"
            )


def build(
    base: Path,
    index: ShardedTensorIndex,
    mode: ExportMode,
    resolution: Resolution,
    precision: Precision,
    staging: Path,
    manifest: Manifest,
    start: Callable[[str], None],
) -> None:
    """Write the package into `staging` and record what it holds in `manifest`; calls `start` with each of
    `STAGES`."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=staging))
    try:
        start("building")
        source = base
        if mode.name == "merged":
            source = work / "merged"
            with _captured():  # transformers' progress bars
                _write_merged(base, index, resolution, precision, source)
        _run_builder(source, work / "package", work / "cache", precision)
        start("adding VeRA")
        graph = ir.load(work / "package" / MODEL_NAME)
        manifest.opset = graph.opset_imports.get("", manifest.opset)
        if mode.name == "adapter":
            (adapter,) = resolution.adapters
            shapes = {name: tuple(info.shape) for name, info in index.tensors.items()}
            layers = match_layers(adapter, shapes)
            manifest.overridable = add_branches(graph.graph, adapter, layers, shapes, precision.dtype)
            projections = resolution.projections
            manifest.projections = projection_fingerprint(adapter, projections)
            manifest.projections["graph_sha256"] = projection_digest(
                projections.vera_A.to(precision.dtype), projections.vera_B.to(precision.dtype)
            )
            manifest.layers, manifest.replaced = resolution.layers, resolution.replaced
        start("writing")
        ir.save(graph, staging / MODEL_NAME, external_data=DATA_NAME)
        del graph
        if precision.dtype == torch.float16:
            _strip_value_info(staging / MODEL_NAME)
        for path in sorted((work / "package").iterdir()):
            if path.name not in (MODEL_NAME, DATA_NAME, f"{MODEL_NAME}.data"):
                shutil.copy2(path, staging / path.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_merged(
    base: Path, index: ShardedTensorIndex, resolution: Resolution, precision: Precision, out: Path
) -> None:
    """The merged checkpoint the builder reads: the base's files, its weights folded in the precision's weight
    dtype (float32 before int4 quantization)."""
    out.mkdir()
    side_files(base, index.shards).copy(out)  # tokenizer, generation config
    model = merge_into(load_model(base, precision.dtype), resolution.adapters)
    model.config.use_cache = True
    model.save_pretrained(out)
    del model


def _run_builder(source: Path, out: Path, cache: Path, precision: Precision) -> None:
    """Run the GenAI model builder in this process, its chatter kept off our stdout and stderr (and the logging
    configuration that importing ONNX Runtime's quantizer sets up, INFO on the root logger, undone after)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        _build(source, out, cache, precision)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _build(source: Path, out: Path, cache: Path, precision: Precision) -> None:
    with _captured() as log:
        try:
            from onnxruntime_genai.models.builder import create_model, parse_extra_options

            options = parse_extra_options(None, str(source), str(out), precision.name, "cpu", str(cache), [])
            create_model(None, str(source), str(out), precision.name, "cpu", str(cache), **options)
        except Exception as exc:  # the builder raises plain Exception and friends
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            said = f"; it said: {lines[-1][:300]}" if lines else ""
            raise CheckpointError(
                f"the ONNX Runtime GenAI model builder failed ({type(exc).__name__}: {str(exc)[:300]}){said}; "
                f"--debug shows its traceback"
            ) from exc
    if not (out / GENAI_CONFIG_NAME).is_file():
        raise CheckpointError(f"the ONNX Runtime GenAI model builder wrote no {GENAI_CONFIG_NAME}")


@contextlib.contextmanager
def _captured() -> Iterator[Path]:
    """File descriptors 1 and 2 go to a temporary file for the block (the builder and ONNX Runtime print from C
    as well as from Python); yields the file's path."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.NamedTemporaryFile(prefix="vera-export-builder-", suffix=".log") as log:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            with contextlib.redirect_stdout(sys.__stdout__), contextlib.redirect_stderr(sys.__stderr__):
                yield Path(log.name)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def _strip_value_info(path: Path) -> None:
    """Drop the intermediate shapes the builder records: with them ONNX Runtime 1.32 plans a buffer of the prefill's
    shape for a value of the builder's float16 CPU graph and fails at the first decoding step."""
    model = onnx.load(str(path), load_external_data=False)
    del model.graph.value_info[:]
    onnx.save(model, str(path))


def genai_inputs(onnx_dir: Path) -> list[str]:
    """The decoder inputs `genai_config.json` names (what GenAI feeds the graph)."""
    config = json.loads((onnx_dir / GENAI_CONFIG_NAME).read_text(encoding="utf-8"))
    return list(config["model"]["decoder"]["inputs"].values())
