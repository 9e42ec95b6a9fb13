"""Streaming merge and unmerge of whole checkpoints, shard by shard and tensor by tensor.

Peak memory is one weight, its factors and a block buffer: a model of any size merges on a small machine. Each
output shard has the same tensors, order, dtypes and shapes as its input shard; untouched tensors are copied byte
for byte, and every other file of the model directory travels along.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import VeraAdapter, load_adapter
from .errors import CheckpointError
from .fold import fold, stack_factors
from .options import MergeOptions
from .outputs import staged_output
from .plan import Plan, build_plan
from .progress import progress_bar
from .safetensors_io import INDEX_NAME, LazyTensorLoader, SafetensorsWriter, ShardedTensorIndex, write_index

# Weight files of other formats hold the unmerged weights; copying them would ship a stale model next to the merged one.
_STALE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data")


@dataclass
class MergeReport:
    """What a merge or unmerge did."""

    output: Path
    adapters: list[str]
    folded: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "adapters": self.adapters,
            "folded": len(self.folded),
            "replaced": self.replaced,
            "copied": self.copied,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
        }


def merge(
    base: str | Path,
    adapters: Sequence[str | Path | VeraAdapter],
    output: str | Path,
    options: MergeOptions = MergeOptions(),
) -> MergeReport:
    """Fold one or more VeRA adapters into a base checkpoint and write a merged Hugging Face checkpoint.

    Several adapters fold in order with a single rounding per element. Trained biases and `modules_to_save`
    tensors replace the base's.

    Args:
        base: Hugging Face model directory (`config.json` and safetensors weights, sharded or not).
        adapters: PEFT VeRA adapter directories, or adapters already loaded with `load_adapter`.
        output: Directory to create; written in full or not at all.
        options: See `MergeOptions`.
    """
    loaded = [_load(a, options) for a in adapters]
    return _rewrite(Path(base), loaded, Path(output), alpha=1.0, options=options)


def unmerge(
    merged: str | Path,
    adapters: Sequence[str | Path | VeraAdapter],
    output: str | Path,
    options: MergeOptions = MergeOptions(),
) -> MergeReport:
    """Subtract the adapters' deltas from a merged checkpoint by the same precision rule.

    Tensors the merge replaced (trained biases, `modules_to_save`) cannot be recovered from the merged checkpoint;
    they are copied as they are and listed in the report's warnings.
    """
    loaded = [_load(a, options) for a in adapters]
    return _rewrite(Path(merged), loaded, Path(output), alpha=-1.0, options=options)


def _load(adapter: str | Path | VeraAdapter, options: MergeOptions) -> VeraAdapter:
    return adapter if isinstance(adapter, VeraAdapter) else load_adapter(adapter, allow_pickle=options.allow_pickle)


def _rewrite(source: Path, adapters: list[VeraAdapter], output: Path, alpha: float, options: MergeOptions) -> MergeReport:
    started = time.perf_counter()
    index = ShardedTensorIndex.from_dir(source)
    plan = build_plan(adapters, index.tensors, options.rounding)
    report = MergeReport(output, [str(a.path) for a in adapters], warnings=list(plan.warnings))
    if alpha < 0 and plan.replacements:
        report.warnings.append(
            f"{len(plan.replacements)} tensors were replaced by the merge (trained biases, modules_to_save) and cannot "
            f"be recovered from the merged checkpoint; they are kept as merged: {', '.join(sorted(plan.replacements))}"
        )
    device = torch.device(options.device)
    total = sum(info.nbytes for info in index.tensors.values())
    label = "merging" if alpha > 0 else "unmerging"
    with staged_output(output, [source, *(a.path for a in adapters)], options.force) as staging:
        with LazyTensorLoader(index) as loader, progress_bar(total, label, options.progress) as advance:
            for shard in index.shards:
                _rewrite_shard(index, shard, loader, plan, staging, alpha, device, options.block_rows, report, advance)
        if index.is_sharded:
            write_index(staging / INDEX_NAME, index.weight_map, index.index_metadata or {})
        report.warnings.extend(_copy_side_files(source, staging))
    report.seconds = time.perf_counter() - started
    return report


def _rewrite_shard(
    index: ShardedTensorIndex,
    shard: Path,
    loader: LazyTensorLoader,
    plan: Plan,
    staging: Path,
    alpha: float,
    device: torch.device,
    block_rows: int,
    report: MergeReport,
    advance: Callable[[int], None],
) -> None:
    infos = index.shard_tensors(shard)
    metadata = {**index.metadata(shard), "format": "pt"}
    entries = [(info.name, info.dtype, info.shape) for info in infos]
    with SafetensorsWriter(staging / shard.name, entries, metadata) as writer:
        for info in infos:
            deltas = plan.deltas.get(info.name)
            if deltas is not None:
                weight = loader.load(info)
                left, right = stack_factors([delta.factors(device) for delta in deltas])
                fold(weight.to(device), left, right, alpha=alpha, out=weight, block_rows=block_rows)
                _check_finite(weight, info.name, loader, info)
                writer.write(info.name, weight)
                report.folded.append(info.name)
            elif info.name in plan.replacements and alpha > 0:
                writer.write(info.name, plan.replacements[info.name].to(info.dtype).contiguous())
                report.replaced.append(info.name)
            else:
                writer.copy_from(info.name, info)
                report.copied += 1
            report.bytes_written += info.nbytes
            advance(info.nbytes)


def _check_finite(result: torch.Tensor, name: str, loader: LazyTensorLoader, info) -> None:
    if torch.isfinite(result).all():
        return
    if not torch.isfinite(loader.load(info)).all():
        return  # the input already held NaN or Inf; the fold did not make it worse
    raise CheckpointError(
        f"{name}: the merge produced NaN or Inf (the delta overflows {result.dtype}); check the adapter's lambdas"
    )


def _copy_side_files(source: Path, staging: Path) -> list[str]:
    """Copy every file that is not safetensors weights; skip (and report) weights of other formats."""
    skipped = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or path.suffix == ".safetensors" or relative.name == INDEX_NAME:
            continue
        if path.name.endswith(_STALE_WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            skipped.append(str(relative))
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    if skipped:
        return [f"not copied (weights of another format would not match the merged ones): {', '.join(skipped)}"]
    return []
