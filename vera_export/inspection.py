"""Describe an adapter, and with a base model, everything that keeps it from applying, all at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, VeraAdapter, load_adapter
from .errors import VeraExportError
from .plan import build_plan
from .projections import Rounding, generate_projections
from .safetensors_io import ShardedTensorIndex
from .targets import incompatibilities, linear_weights, match_layers, untrained_targets


@dataclass
class InspectReport:
    """What `vera-export inspect` prints; `to_json` is its `--json` form."""

    adapter: dict
    layers: list[dict]
    projections: dict
    base: str | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "adapter": self.adapter,
            "layers": self.layers,
            "projections": self.projections,
            "base": self.base,
            "compatible": self.compatible if self.base else None,
            "problems": self.problems,
            "warnings": self.warnings,
        }

    def text(self) -> str:
        a = self.adapter
        lines = [
            f"adapter     {a['path']}",
            f"r           {a['r']}",
            f"targets     {a['target_modules']}"
            + (f" (layers {a['layers_to_transform']})" if a["layers_to_transform"] is not None else ""),
            f"layers      {len(self.layers)}",
            f"bias        {a['bias']}; modules_to_save {a['modules_to_save'] or 'none'}",
            f"trainable   {a['trainable_parameters']:,} parameters; checkpoint {a['checkpoint_bytes']:,} bytes",
            f"projections {self.projections['summary']}",
        ]
        for layer in self.layers:
            shape = (
                f" weight {layer['weight_shape']}{' (fan_in_fan_out)' if layer.get('fan_in_fan_out') else ''}"
                if "weight_shape" in layer
                else ""
            )
            lines.append(
                f"  {layer['module']}: lambda_b {layer['lambda_b']}, lambda_d {layer['lambda_d']}{shape}"
            )
        if self.base:
            verdict = "fits" if self.compatible else f"does NOT fit ({len(self.problems)} problems)"
            lines.append(f"base        {self.base}: {verdict}")
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def inspect(
    adapter: str | Path | VeraAdapter, base: str | Path | None = None, allow_pickle: bool = False
) -> InspectReport:
    """Describe an adapter: config, layers, size, projections; and with `base`, every incompatibility with it.

    Stored projections are compared with what `projection_prng_key` regenerates, under both CPU roundings (see
    `projections.Rounding`), so the report says whether the checkpoint would reload identically without them.
    """
    adapter = load_adapter(adapter, allow_pickle)
    config = adapter.config
    weights = next(
        (f for f in (adapter.path / WEIGHTS_NAME, adapter.path / PICKLE_WEIGHTS_NAME) if f.is_file()), None
    )
    summary = {
        "path": str(adapter.path),
        "r": config.r,
        "target_modules": config.target_modules
        if isinstance(config.target_modules, str)
        else list(config.target_modules),
        "layers_to_transform": config.layers_to_transform,
        "fan_in_fan_out": config.fan_in_fan_out,
        "bias": config.bias,
        "modules_to_save": list(config.modules_to_save),
        "projection_prng_key": config.projection_prng_key,
        "save_projection": config.save_projection,
        "trainable_parameters": adapter.num_trainable_parameters(),
        "checkpoint_bytes": weights.stat().st_size if weights is not None else 0,
        "replaced_tensors": sorted(adapter.replacements),
    }
    layers = [
        {"module": m, "lambda_b": layer.lambda_b.numel(), "lambda_d": layer.lambda_d.numel()}
        for m, layer in adapter.layers.items()
    ]
    report = InspectReport(summary, layers, _stored_projections(adapter), warnings=list(adapter.warnings))
    if base is not None:
        _against_base(report, adapter, Path(base))
    return report


def _stored_projections(adapter: VeraAdapter) -> dict:
    if adapter.vera_A is None:
        return {
            "source": "regenerated",
            "summary": f"regenerated from projection_prng_key {adapter.config.projection_prng_key}",
        }
    match = _regeneration_match(adapter)
    if match:
        verdict = f"equal to what the key regenerates ({match})"
    else:
        verdict = (
            "differ from what the key regenerates: keep them stored (do not set save_projection to false)"
        )
    return {
        "source": "stored",
        "vera_A": list(adapter.vera_A.shape),
        "vera_B": list(adapter.vera_B.shape),
        "regenerated_equal": bool(match),
        "regenerated_as": match,
        "summary": f"stored, vera_A {list(adapter.vera_A.shape)}, vera_B {list(adapter.vera_B.shape)}; {verdict}",
    }


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
                cast = (
                    ""
                    if dtype == torch.float32
                    else f", rounded to {str(dtype).removeprefix('torch.')} as on a 16-bit model"
                )
                return f"{rounding.value} rounding{cast}"
    return None


def _against_base(report: InspectReport, adapter: VeraAdapter, base: Path) -> None:
    report.base = str(base)
    try:
        index = ShardedTensorIndex.from_dir(base)
    except VeraExportError as exc:
        report.problems.append(str(exc))
        return
    shapes = {name: info.shape for name, info in index.tensors.items()}
    report.problems.extend(incompatibilities(adapter, shapes))
    linear = linear_weights(shapes)
    for layer in report.layers:
        shape = linear.get(layer["module"])
        if shape is not None:
            layer["weight_shape"] = list(shape)
    if report.problems:
        return
    targets = match_layers(adapter, shapes)
    for layer in report.layers:
        layer["fan_in_fan_out"] = targets[layer["module"]].fan_in_fan_out
    untrained = untrained_targets(adapter, shapes)
    if untrained:
        report.warnings.append(
            f"target_modules also matches {len(untrained)} layers without lambdas: {', '.join(untrained)}"
        )
    try:  # what merge checks on top of the fit: projections, dtypes, tensors both adapted and replaced
        plan = build_plan([adapter], index.tensors)
        plan.check_foldable(index.tensors)
    except VeraExportError as exc:
        report.problems.append(str(exc))
        return
    projections = plan.projections[str(adapter.path)]
    if not projections.stored:
        shape_A, shape_B = list(projections.vera_A.shape), list(projections.vera_B.shape)
        report.projections.update(vera_A=shape_A, vera_B=shape_B)
        report.projections["summary"] += f": vera_A {shape_A}, vera_B {shape_B}"
