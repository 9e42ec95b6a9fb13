"""Describe an adapter, and with a base model, everything that keeps it from applying, all at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import VeraAdapter, load_adapter
from .errors import VeraExportError, counted
from .io.index import ShardedTensorIndex
from .io.locations import Kind, locate
from .names import model_names
from .options import InspectOptions, Rounding
from .plan import build_plan
from .projections import generate_projections
from .provenance import Record, describe_adapter, shown_record
from .reports import JsonFields
from .targets import incompatibilities, linear_weights, match_layers, untrained_targets


@dataclass
class LayerSummary:
    """One adapted layer: its lambdas' lengths and, against a base, its weight's shape and layout."""

    module: str
    lambda_b: int
    lambda_d: int
    weight_shape: list[int] | None = None
    fan_in_fan_out: bool | None = None


@dataclass
class ProjectionSummary:
    """Where the projections come from, and whether stored ones equal what the key regenerates.

    Attributes:
        source: `"stored"` or `"regenerated"`.
        vera_A: Shape of vera_A (stored, or regenerated for the base when one is given).
        vera_B: Shape of vera_B.
        regenerated_equal: Stored projections only: whether `projection_prng_key` reproduces them.
        regenerated_as: How it reproduces them (CPU rounding, PEFT's cast to a 16-bit model).
        summary: One line for people.
    """

    source: str
    summary: str
    vera_A: list[int] | None = None
    vera_B: list[int] | None = None
    regenerated_equal: bool | None = None
    regenerated_as: str | None = None


@dataclass
class InspectReport(JsonFields):
    """What `vera-export inspect` prints.

    Attributes:
        path: The adapter directory.
        r, target_modules, layers_to_transform, fan_in_fan_out, bias, modules_to_save, projection_prng_key,
            save_projection: From its config.
        trainable_parameters: Lambdas plus replaced tensors.
        checkpoint_bytes: Size of its weights file.
        replaced_tensors: Base tensors it replaces.
        layers: Its adapted layers.
        projections: Where its projections come from.
        base: The base it was checked against, if any.
        base_record: That base's provenance record, when it is a vera-export merge (see `provenance`).
        problems: Every reason it does not fit that base.
        warnings: Things worth knowing.
    """

    path: Path
    r: int
    target_modules: str | list[str]
    layers_to_transform: int | list[int] | None
    fan_in_fan_out: bool
    bias: str
    modules_to_save: list[str]
    projection_prng_key: int
    save_projection: bool
    trainable_parameters: int
    checkpoint_bytes: int
    replaced_tensors: list[str]
    layers: list[LayerSummary]
    projections: ProjectionSummary
    base: Path | None = None
    base_record: dict | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    command = "inspect"
    json_properties = ("compatible",)

    @property
    def compatible(self) -> bool | None:
        """Whether the adapter fits `base`; None without a base."""
        return None if self.base is None else not self.problems

    @property
    def ok(self) -> bool:
        return self.compatible is not False

    def text(self, quiet: bool = False) -> str:
        targets = (
            self.target_modules if isinstance(self.target_modules, str) else ", ".join(self.target_modules)
        )
        layers_note = f" (layers {self.layers_to_transform})" if self.layers_to_transform is not None else ""
        lines = [
            f"adapter     {self.path}",
            f"r           {self.r}",
            f"targets     {targets}{layers_note}",
            f"layers      {len(self.layers)}",
            f"bias        {self.bias}; modules_to_save {', '.join(self.modules_to_save) or 'none'}",
            f"trainable   {self.trainable_parameters:,} parameters; checkpoint {self.checkpoint_bytes:,} bytes",
            f"projections {self.projections.summary}",
        ]
        for layer in self.layers:
            shape = ""
            if layer.weight_shape is not None:
                layout = " (fan_in_fan_out)" if layer.fan_in_fan_out else ""
                shape = f" weight {layer.weight_shape}{layout}"
            lines.append(f"  {layer.module}: lambda_b {layer.lambda_b}, lambda_d {layer.lambda_d}{shape}")
        if self.base is not None:
            verdict = (
                "fits" if self.compatible else f"does NOT fit ({counted(len(self.problems), 'problem')})"
            )
            lines.append(f"base        {self.base}: {verdict}")
            if self.base_record is not None:
                lines.append(f"  record: {Record.from_json(self.base_record).summary()}")
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def inspect(
    adapter: str | Path | VeraAdapter,
    base: str | Path | None = None,
    options: InspectOptions = InspectOptions(),
) -> InspectReport:
    """Describe an adapter: config, layers, size, projections; and with `base`, every incompatibility with it.

    Stored projections are compared with what `projection_prng_key` regenerates, under both CPU roundings (see
    `projections.Rounding`), so the report says whether the checkpoint would reload identically without them.
    `report.ok` is False when `base` is given and the adapter does not fit it (an unreadable base included).
    """
    adapter = load_adapter(adapter, options.allow_pickle)
    config = adapter.config
    weights = adapter.weights_file
    report = InspectReport(
        path=adapter.path,
        r=config.r,
        target_modules=config.target_modules
        if isinstance(config.target_modules, str)
        else list(config.target_modules),
        layers_to_transform=config.layers_to_transform,
        fan_in_fan_out=config.fan_in_fan_out,
        bias=config.bias,
        modules_to_save=list(config.modules_to_save),
        projection_prng_key=config.projection_prng_key,
        save_projection=config.save_projection,
        trainable_parameters=adapter.num_trainable_parameters(),
        checkpoint_bytes=weights.stat().st_size if weights is not None else 0,
        replaced_tensors=sorted(adapter.replacements),
        layers=[
            LayerSummary(m, layer.lambda_b.numel(), layer.lambda_d.numel())
            for m, layer in adapter.layers.items()
        ],
        projections=_stored_projections(adapter),
        warnings=list(adapter.warnings),
    )
    if base is not None:
        _against_base(report, adapter, base)
    return report


def _stored_projections(adapter: VeraAdapter) -> ProjectionSummary:
    if adapter.vera_A is None:
        key = adapter.config.projection_prng_key
        return ProjectionSummary("regenerated", f"regenerated from projection_prng_key {key}")
    match = _regeneration_match(adapter)
    if match:
        verdict = f"equal to what the key regenerates ({match})"
    else:
        verdict = (
            "differ from what the key regenerates: keep them stored (do not set save_projection to false)"
        )
    shape_A, shape_B = list(adapter.vera_A.shape), list(adapter.vera_B.shape)
    return ProjectionSummary(
        source="stored",
        summary=f"stored, vera_A {shape_A}, vera_B {shape_B}; {verdict}",
        vera_A=shape_A,
        vera_B=shape_B,
        regenerated_equal=bool(match),
        regenerated_as=match,
    )


def _regeneration_match(adapter: VeraAdapter) -> str | None:
    """How the key reproduces the stored projections, if it does: CPU rounding, and PEFT's cast to a 16-bit model."""
    config = adapter.config
    stored = (adapter.vera_A.float(), adapter.vera_B.float())
    for rounding in Rounding:
        regenerated = generate_projections(
            config.projection_prng_key, config.r, stored[0].shape[1], stored[1].shape[0], rounding
        )
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            candidate = [t.to(dtype).float() for t in regenerated]
            if all(torch.equal(s, c) for s, c in zip(stored, candidate)):
                name = str(dtype).removeprefix("torch.")
                cast = "" if dtype == torch.float32 else f", rounded to {name} as on a 16-bit model"
                return f"{rounding.value} rounding{cast}"
    return None


def _base_record(report: InspectReport, adapter: VeraAdapter, index: ShardedTensorIndex) -> None:
    """The base's record, and a problem when it says this adapter is merged in already (merge would refuse)."""
    record = shown_record(index, report.warnings)
    if record is None:
        return
    report.base_record = record.to_json()
    if record.lists(describe_adapter(adapter)):
        report.problems.append(
            f"{index.root} records this adapter as merged in already; merge refuses it (--ignore-record)"
        )


def _against_base(report: InspectReport, adapter: VeraAdapter, location: str | Path) -> None:
    report.base = Path(location)
    try:
        base = locate(location, Kind.BASE)
        index = model_names(base, ShardedTensorIndex.from_dir(base), [adapter]).index
    except VeraExportError as exc:
        report.problems.append(str(exc))
        return
    _base_record(report, adapter, index)
    shapes = {name: info.shape for name, info in index.tensors.items()}
    report.problems.extend(incompatibilities(adapter, shapes))
    linear = linear_weights(shapes)
    for layer in report.layers:
        shape = linear.get(layer.module)
        if shape is not None:
            layer.weight_shape = list(shape)
    if report.problems:
        return
    targets = match_layers(adapter, shapes)
    for layer in report.layers:
        layer.fan_in_fan_out = targets[layer.module].fan_in_fan_out
    untrained = untrained_targets(adapter, shapes)
    if untrained:
        report.warnings.append(
            f"target_modules also matches {len(untrained)} layers without lambdas: {', '.join(untrained)}"
        )
    try:  # what merge checks on top of the fit: projections, dtypes, tensors both adapted and replaced
        plan = build_plan([adapter], index.tensors)
        plan.check_foldable(index.tensors)
        plan.check_base_copies(index.tensors)
    except VeraExportError as exc:
        report.problems.append(str(exc))
        return
    projections = plan.projections[adapter]
    if not projections.stored:
        shape_A, shape_B = list(projections.vera_A.shape), list(projections.vera_B.shape)
        report.projections.vera_A, report.projections.vera_B = shape_A, shape_B
        report.projections.summary += f": vera_A {shape_A}, vera_B {shape_B}"
