"""Streaming merge and unmerge of whole checkpoints, shard by shard and tensor by tensor.

Peak memory is a few weights, their factors and two block buffers: a model of any size merges on a small
machine. The next weight is read and the previous one written while the current one folds. Each output shard has
the same tensors, order, dtypes and shapes as its input shard; untouched tensors are copied byte for byte, and
every other file of the model directory travels along. The output carries a provenance record and a model card
(see `provenance`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import VeraAdapter, load_adapter
from .errors import CheckpointError, SetupError, counted, listing
from .fold import fold
from .io.header import TensorInfo
from .io.index import INDEX_NAME, ShardedTensorIndex
from .io.loader import LazyTensorLoader
from .io.locations import Kind, locate
from .io.model_config import read_model_config
from .io.outputs import after_output, staged_output
from .io.side_files import side_files
from .io.streams import BackgroundSink, prefetch
from .io.writer import SafetensorsWriter, write_index
from .names import model_names, write_untied_config
from .options import MergeOptions, Rounding, UnmergeOptions, VerifyOptions
from .plan import LayerDelta, build_plan
from .precision import all_finite
from .progress import progress_bar
from .provenance import (
    METADATA_KEY,
    BaseDigests,
    Record,
    checkpoint_record,
    describe_adapter,
    next_record,
    write_record,
)
from .reports import JsonFields, duration
from .verification import VerifyReport, verify


@dataclass
class MergeReport(JsonFields):
    """What a merge or unmerge did, and the verification of its output when one ran.

    Attributes:
        command: `"merge"` or `"unmerge"`.
        output: The directory written.
        adapters: The adapters folded in (or subtracted), in order.
        folded: The weights the deltas were folded into.
        replaced: The tensors the adapters' trained tensors replaced.
        copied: How many tensors were copied unchanged.
        bytes_written: Tensor bytes written.
        seconds: Wall time.
        verification: `verify`'s report on the output, with `MergeOptions.verify`.
        record: The provenance record written with the output (see `provenance`); None when unmerging a
            checkpoint that carries none.
        warnings: Things the user should know.
    """

    command: str = field(repr=False)
    output: Path
    adapters: list[str]
    folded: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    verification: VerifyReport | None = None
    record: dict | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verification is None or self.verification.ok

    def text(self, quiet: bool = False) -> str:
        adapters = counted(len(self.adapters), "adapter")
        if self.command == "merge":
            line = (
                f"merged {adapters} into {self.output}: {counted(len(self.folded), 'weight')} folded, "
                f"{counted(len(self.replaced), 'tensor')} replaced, {self.copied} copied ({duration(self.seconds)})"
            )
        else:
            line = (
                f"unmerged {adapters} into {self.output}: {counted(len(self.folded), 'weight')} restored "
                f"({duration(self.seconds)})"
            )
        if self.verification is None:
            return line
        return line + "\n" + self.verification.text(quiet)


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

    Returns:
        The report; with `options.verify`, `report.ok` is the verdict of the verification that ran on it.
    """
    device = fold_device(options.device)
    base = locate(base, Kind.BASE)
    loaded = [load_adapter(a, options.allow_pickle) for a in adapters]
    report = _rewrite(
        "merge", base, loaded, Path(output), 1.0, device, options.block_rows, options.overlap,
        options.force, options.fsync, options.rounding, options.progress, options.ignore_record,
    )  # fmt: skip
    if options.verify:
        verify_options = VerifyOptions(
            allow_pickle=options.allow_pickle, rounding=options.rounding, progress=options.progress
        )
        with after_output("its verification"):
            report.verification = verify(base, loaded, report.output, verify_options)
        report.warnings.extend(report.verification.warnings)
    return report


def fold_device(device: str) -> str:
    """`device` if this machine and this torch can fold there; else one line saying what to do instead.

    Raises:
        SetupError: A CUDA device that torch was built without, or that this machine does not have.
    """
    if not device.startswith("cuda"):
        return device
    if not torch.cuda.is_available():
        built = "was built without CUDA" if torch.version.cuda is None else "finds no CUDA device"
        raise SetupError(
            f"--device {device}: torch {torch.__version__} {built}; fold on the CPU (--device cpu, the default)"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise SetupError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
        )
    return device


def unmerge(
    merged: str | Path,
    adapters: Sequence[str | Path | VeraAdapter],
    output: str | Path,
    options: UnmergeOptions = UnmergeOptions(),
) -> MergeReport:
    """Subtract the adapters' deltas from a merged checkpoint by the same precision rule.

    Tensors the merge replaced (trained biases, `modules_to_save`) cannot be recovered from the merged checkpoint;
    they are copied as they are and listed in the report's warnings.
    """
    device = fold_device(options.device)
    merged = locate(merged, Kind.MERGED)
    loaded = [load_adapter(a, options.allow_pickle) for a in adapters]
    return _rewrite(
        "unmerge", merged, loaded, Path(output), -1.0, device, options.block_rows, options.overlap,
        options.force, options.fsync, options.rounding, options.progress, options.ignore_record,
    )  # fmt: skip


def _rewrite(
    command: str,
    source: Path,
    adapters: list[VeraAdapter],
    output: Path,
    alpha: float,
    device: str,
    block_rows: int,
    overlap: bool,
    force: bool,
    fsync: bool,
    rounding: Rounding,
    progress: bool,
    ignore_record: bool,
) -> MergeReport:
    started = time.perf_counter()
    index = ShardedTensorIndex.from_dir(source)
    carried = checkpoint_record(index)
    has_config = read_model_config(source) is not None  # the output must load with from_pretrained
    names = model_names(source, index, adapters)
    plan = build_plan(adapters, names.index.tensors, rounding)
    plan.check_foldable(names.index.tensors)
    if alpha > 0:
        plan.check_base_copies(names.index.tensors)
        index = names.output
    # Unmerging: a tied checkpoint merged by PEFT holds the head's delta in the shared tensor, subtracted there.
    plan = names.to_checkpoint(plan, keep_ties=alpha < 0)
    report = MergeReport(command, output, [str(a.path) for a in adapters], warnings=list(plan.warnings))
    if alpha > 0:
        report.warnings.extend(names.notes())
    if not has_config:
        report.warnings.append(f"{source} has no config.json: the output will not load with from_pretrained")
    if alpha < 0 and plan.replacements:
        report.warnings.append(
            f"{len(plan.replacements)} tensors were replaced by the merge (trained biases, modules_to_save) and cannot "
            f"be recovered from the merged checkpoint; they are kept as merged: {', '.join(sorted(plan.replacements))}"
        )
    replacements = plan.replacements if alpha > 0 else {}
    described = [entry for a in adapters if (entry := describe_adapter(a)) is not None]
    record = None
    if alpha > 0 or carried is not None:
        record = next_record(source, carried, described, alpha, ignore_record)
    else:
        report.warnings.append(
            f"{source} carries no vera-export record: which adapters it holds could not be checked, and the "
            f"output gets no record"
        )
    side = side_files(source, index.shards)  # every file checked before the first byte is written
    report.warnings.extend(side.warnings())
    label = "merging" if alpha > 0 else "unmerging"
    total = sum(info.nbytes for info in index.tensors.values())
    with staged_output(output, [source, *(a.path for a in adapters)], force, fsync) as staging:
        # The base's own files are hashed beside the merge, unless its record already has them.
        hashing = (
            BaseDigests(source, index.shards) if record is not None and carried is None else nullcontext()
        )
        with hashing as digests:
            with progress_bar(total, label, progress) as advance:
                rewrite_tensors(
                    index, plan.deltas, replacements, staging, alpha, torch.device(device), block_rows, fsync,
                    overlap, report, advance, record,
                )  # fmt: skip
            if index.is_sharded:
                write_index(staging / INDEX_NAME, index.weight_map, index.index_metadata or {}, fsync)
            side.copy(staging)
            if alpha > 0 and names.tied:
                write_untied_config(staging)
            if record is not None:
                if digests is not None:
                    record.base["sha256"] = digests.join()
                write_record(staging, record, source)
                report.record = record.to_json()
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
    record: Record | None = None,
) -> None:
    """Write every shard of `index` into `staging`, folding `deltas` (scaled by alpha) and swapping in `replacements`.

    With `overlap`, the next weight is read and the previous one written while the current one folds. With a
    `record`, each shard's metadata carries it (`Record.metadata`).
    """

    nonfinite: list[str] = []

    def read(shard: Path, info: TensorInfo) -> _Item:
        if info.name in deltas:
            weight = loader.load(info)
            if not all_finite(weight):  # in the reader thread, beside the fold
                nonfinite.append(info.name)
            return _Item(shard, info, weight, folded=True)
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

    with (
        LazyTensorLoader(index) as loader,
        _ShardWriter(index, staging, fsync, report, advance, record) as writer,
    ):
        items = (read(shard, info) for shard in index.shards for info in index.shard_tensors(shard))
        if not overlap:
            for item in items:
                writer.write(fold_item(item))
        else:
            with BackgroundSink(writer.write) as sink:
                for item in prefetch(items):
                    sink.put(fold_item(item))
    if nonfinite:
        report.warnings.append(
            f"{counted(len(nonfinite), 'adapted weight')} of the base hold NaN or Inf, kept where they are (the sum is "
            f"not finite there either): {listing(nonfinite, 5)}"
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
        record: Record | None = None,
    ) -> None:
        self.index, self.staging, self.fsync, self.report, self.advance = (
            index,
            staging,
            fsync,
            report,
            advance,
        )
        self.record = None if record is None else record.metadata()
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
        metadata.pop(METADATA_KEY, None)  # a merged base's record: the new one replaces it
        if self.record is not None:
            metadata[METADATA_KEY] = self.record
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
