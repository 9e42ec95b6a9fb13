"""Streaming merge and unmerge of whole checkpoints, shard by shard and tensor by tensor.

Peak memory is a few weights, their factors and two block buffers: a model of any size merges on a small
machine. The next weight is read and the previous one written while the current one folds. Each output shard has
the same tensors, order, dtypes and shapes as its input shard; untouched tensors are copied byte for byte, and
every other file of the model directory travels along.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import VeraAdapter, load_adapter
from .errors import CheckpointError, IncompatibleAdapterError
from .fold import fold
from .options import MergeOptions
from .outputs import staged_output
from .plan import LayerDelta, Plan, build_plan
from .progress import progress_bar
from .safetensors_io import INDEX_NAME, LazyTensorLoader, ShardedTensorIndex, TensorInfo
from .safetensors_writer import SafetensorsWriter, write_index
from .streams import BackgroundSink, prefetch

# Weight files other than the checkpoint's own shards hold unmerged weights; copying them would ship a stale model
# next to the merged one.
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
    loaded = [load_adapter(a, options.allow_pickle) for a in adapters]
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
    loaded = [load_adapter(a, options.allow_pickle) for a in adapters]
    return _rewrite(Path(merged), loaded, Path(output), alpha=-1.0, options=options)


def _rewrite(
    source: Path, adapters: list[VeraAdapter], output: Path, alpha: float, options: MergeOptions
) -> MergeReport:
    started = time.perf_counter()
    index = ShardedTensorIndex.from_dir(source)
    plan = build_plan(adapters, index.tensors, options.rounding)
    plan.check_foldable(index.tensors)
    if alpha > 0 and plan.replacements:
        _refuse_tied_replacements(source, plan)
    report = MergeReport(output, [str(a.path) for a in adapters], warnings=list(plan.warnings))
    if alpha < 0 and plan.replacements:
        report.warnings.append(
            f"{len(plan.replacements)} tensors were replaced by the merge (trained biases, modules_to_save) and cannot "
            f"be recovered from the merged checkpoint; they are kept as merged: {', '.join(sorted(plan.replacements))}"
        )
    replacements = plan.replacements if alpha > 0 else {}
    label = "merging" if alpha > 0 else "unmerging"
    total = sum(info.nbytes for info in index.tensors.values())
    with staged_output(
        output, [source, *(a.path for a in adapters)], options.force, options.fsync
    ) as staging:
        with progress_bar(total, label, options.progress) as advance:
            rewrite_tensors(
                index,
                plan.deltas,
                replacements,
                staging,
                alpha,
                torch.device(options.device),
                options.block_rows,
                options.fsync,
                options.overlap,
                report,
                advance,
            )
        if index.is_sharded:
            write_index(staging / INDEX_NAME, index.weight_map, index.index_metadata or {}, options.fsync)
        report.warnings.extend(copy_side_files(source, staging, index.shards))
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _Item:
    """One output tensor on its way through read -> fold -> write."""

    shard: Path
    info: TensorInfo
    tensor: torch.Tensor | None = None  # None: copy the source bytes unchanged
    folded: bool = False


def rewrite_tensors(
    index: ShardedTensorIndex,
    deltas: dict[str, list[LayerDelta]],
    replacements: dict[str, torch.Tensor],
    staging: Path,
    alpha: float,
    device: torch.device,
    block_rows: int,
    fsync: bool,
    overlap: bool,
    report: MergeReport,
    advance: Callable[[int], None],
) -> None:
    """Write every shard of `index` into `staging`, folding `deltas` (scaled by alpha) and swapping in `replacements`.

    With `overlap`, the next weight is read and the previous one written while the current one folds.
    """

    def read(shard: Path, info: TensorInfo) -> _Item:
        if info.name in deltas:
            return _Item(shard, info, loader.load(info), folded=True)
        if info.name in replacements:
            return _Item(shard, info, replacements[info.name].to(info.dtype).contiguous())
        return _Item(shard, info)

    def fold_item(item: _Item) -> _Item:
        name = item.info.name
        if item.folded:
            try:
                layer_deltas = [delta.delta(device) for delta in deltas[name]]
                fold(
                    item.tensor.to(device), layer_deltas, alpha=alpha, out=item.tensor, block_rows=block_rows
                )
            except FloatingPointError as exc:
                raise CheckpointError(f"{name}: the merge {exc}; check the adapter's lambdas") from None
        return item

    with LazyTensorLoader(index) as loader, _ShardWriter(index, staging, fsync, report, advance) as writer:
        items = (read(shard, info) for shard in index.shards for info in index.shard_tensors(shard))
        if not overlap:
            for item in items:
                writer.write(fold_item(item))
            return
        with BackgroundSink(writer.write) as sink:
            for item in prefetch(items):
                sink.put(fold_item(item))


def _refuse_tied_replacements(source: Path, plan: Plan) -> None:
    """A trained copy of a tied tensor (an input embedding in `modules_to_save`, tied to the output head) replaces
    it only for its own module in PEFT; a checkpoint that stores the pair once cannot say that."""
    from .modeling import (
        tied_partners,
    )  # transformers takes seconds to import: only when tensors are replaced

    try:
        tied = tied_partners(source, plan.replacements)
    except CheckpointError:
        return  # an architecture transformers does not know: nothing ties its tensors when it is loaded either
    if tied:
        name, partners = next(iter(tied.items()))
        raise IncompatibleAdapterError(
            f"the adapter trains {name}, which this model ties to {', '.join(partners)} (tie_word_embeddings); PEFT "
            f"uses the trained copy for {name} only, which a tied checkpoint cannot hold - save the base with "
            f"tie_word_embeddings false (both tensors stored) and merge that"
        )


class _ShardWriter:
    """Writes items into the shard files in order; each shard's file is started when its turn comes."""

    def __init__(
        self,
        index: ShardedTensorIndex,
        staging: Path,
        fsync: bool,
        report: MergeReport,
        advance: Callable[[int], None],
    ) -> None:
        self.index, self.staging, self.fsync, self.report, self.advance = (
            index,
            staging,
            fsync,
            report,
            advance,
        )
        self.pending = list(index.shards)
        self.shard: Path | None = None
        self.writer: SafetensorsWriter | None = None

    def write(self, item: _Item) -> None:
        while item.shard != self.shard:
            self._next_shard()
        name = item.info.name
        if item.tensor is None:
            self.writer.copy_from(name, item.info)
            self.report.copied += 1
        else:
            self.writer.write(name, item.tensor)
            (self.report.folded if item.folded else self.report.replaced).append(name)
        self.report.bytes_written += item.info.nbytes
        self.advance(item.info.nbytes)

    def _next_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
        shard = self.pending.pop(0)
        entries = [(info.name, info.dtype, info.shape) for info in self.index.shard_tensors(shard)]
        metadata = {**self.index.metadata(shard), "format": "pt"}
        path = self.staging / self.index.shard_name(shard)  # shards may sit in subdirectories
        path.parent.mkdir(parents=True, exist_ok=True)
        self.shard, self.writer = shard, SafetensorsWriter(path, entries, metadata, self.fsync)

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self.writer is not None:
                self.writer.__exit__(exc_type, exc, tb)
            return
        while self.pending:  # shards without tensors still get their (empty) file
            self._next_shard()
        if self.writer is not None:
            self.writer.close()


def copy_side_files(source: Path, staging: Path, shards: list[Path]) -> list[str]:
    """Copy every file but the checkpoint's own `shards` and index; skip (and report) any other weights."""
    skipped = []
    own = {shard.resolve() for shard in shards} | {(source / INDEX_NAME).resolve()}
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or path.resolve() in own:
            continue
        if path.name.endswith((*_STALE_WEIGHT_SUFFIXES, ".safetensors", ".index.json")):
            skipped.append(str(relative))
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    if skipped:
        return [
            f"not copied (weights of another format would not match the merged ones): {', '.join(skipped)}"
        ]
    return []
