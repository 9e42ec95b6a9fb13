"""What one or more adapters do to a base checkpoint: which weights receive which deltas, which tensors are replaced.

A plan is built from the safetensors headers and the (small) adapter tensors alone, before any weight is read, so
every incompatibility is reported before an output is started.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .adapter import VeraAdapter
from .errors import IncompatibleAdapterError
from .fold import VeraDelta, projection_squares
from .io.loader import tensor_of
from .precision import FOLDABLE_DTYPES, largest_magnitude, smallest_magnitude
from .projections import Rounding, generate_projections
from .targets import TargetLayer, match_layers, projection_dims, untrained_targets


class TensorSpec(Protocol):
    """Anything with a shape and a dtype: a `safetensors_io.TensorInfo`, or a tensor of a loaded model."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Projections:
    """An adapter's shared `vera_A` (r, max_in) and `vera_B` (max_out, r), and where they came from."""

    vera_A: torch.Tensor
    vera_B: torch.Tensor
    stored: bool

    @functools.cached_property
    def floor(self) -> float:
        """The smallest non-zero |entry| of either projection (see `VeraDelta.fits_float32`)."""
        return min(smallest_magnitude(self.vera_A), smallest_magnitude(self.vera_B))

    @functools.cached_property
    def ceiling(self) -> float:
        """The largest |entry| of either projection (see `VeraDelta.fits_float32`)."""
        return max(largest_magnitude(self.vera_A), largest_magnitude(self.vera_B))

    @functools.cached_property
    def squares(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`fold.projection_squares` of the pair, formed once for every layer (see `VeraDelta.squared_norms`)."""
        return projection_squares(self.vera_A, self.vera_B)


@dataclass(frozen=True)
class LayerDelta:
    """One adapter's change to one layer."""

    adapter: str  # the adapter's name, for messages
    target: TargetLayer
    lambda_b: torch.Tensor
    lambda_d: torch.Tensor
    projections: Projections

    def delta(self, device: torch.device | str = "cpu") -> VeraDelta:
        """The change to the layer's weight, for `fold.fold`, with its tensors on `device`."""
        t = self.target
        return VeraDelta(
            self.lambda_b.to(device),
            self.lambda_d.to(device),
            self.projections.vera_A.to(device),
            self.projections.vera_B.to(device),
            t.in_features,
            t.out_features,
            t.fan_in_fan_out,
            projection_floor=self.projections.floor,
            projection_ceiling=self.projections.ceiling,
            projection_squares=tuple(square.to(device) for square in self.projections.squares),
        )

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`delta_W = left @ right` in the weight's layout, exact in float64."""
        return self.delta().factors(torch.float64)


@dataclass
class Plan:
    """Deltas by weight tensor name (in adapter order), replaced tensors by name, the adapters' saved copies of
    adapted base weights (`check_base_copies`), each adapter's projections (keyed by the adapter itself) and
    warnings for the user."""

    deltas: dict[str, list[LayerDelta]] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)
    projections: dict[VeraAdapter, Projections] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def check_base_copies(self, tensors: Mapping[str, TensorSpec]) -> None:
        """Refuse an adapter whose saved copy of an adapted layer's base weight (PEFT saves `lm_head` whole) is not
        the base's: it was trained on another base, and PEFT would load that copy over the base's weight.

        Args:
            tensors: The base's tensors, in memory or as `TensorInfo` (read here, one at a time).

        Raises:
            IncompatibleAdapterError: Naming the weight.
        """
        for name, copy in self.base_copies.items():
            weight = tensor_of(tensors[name])
            if copy.shape != weight.shape or not torch.equal(copy.to(weight.dtype), weight):
                raise IncompatibleAdapterError(
                    f"{name}: the adapter's saved copy of this base weight ({name.removesuffix('.weight')}"
                    f".base_layer.weight) is not the base's; it was trained on another base model - pass that one"
                )

    def check_foldable(self, tensors: Mapping[str, TensorSpec]) -> None:
        """Refuse, before anything is written, to fold into weights that are not floating point (quantized bases).

        Raises:
            IncompatibleAdapterError: Naming the first such weights and their dtypes.
        """
        unfoldable = [
            f"{name} ({tensors[name].dtype})"
            for name in self.deltas
            if tensors[name].dtype not in FOLDABLE_DTYPES
        ]
        if unfoldable:
            raise IncompatibleAdapterError(
                f"adapted weights are not float16, bfloat16, float32 or float64: {', '.join(unfoldable[:5])}"
                f"{' ...' if len(unfoldable) > 5 else ''}; a quantized base cannot be merged, use the unquantized model"
            )


def resolve_projections(
    adapter: VeraAdapter,
    tensors: Mapping[str, TensorSpec],
    layers: Mapping[str, TargetLayer],
    rounding: Rounding = Rounding.FMA,
) -> Projections:
    """The adapter's stored projections, or the ones PEFT regenerates from `projection_prng_key` for this base.

    PEFT moves the regenerated float32 projections to the dtype of the layer they are attached to and then back
    to float32 (`_move_adapter_to_device_of_base_layer`, then `autocast_adapter_dtype`), so on a 16-bit base they
    are rounded to that dtype once. Regenerated projections are rounded the same way here.

    Args:
        adapter: The adapter.
        tensors: The base's tensors (shape and dtype) by name.
        layers: The adapter's layers in this base (`targets.match_layers`).
        rounding: Which CPU kernel's rounding to regenerate with.

    Raises:
        IncompatibleAdapterError: Stored projections are too small for a targeted layer.
    """
    if adapter.vera_A is None:
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        max_in, max_out = projection_dims(adapter, shapes)
        vera_A, vera_B = generate_projections(
            adapter.config.projection_prng_key, adapter.config.r, max_in, max_out, rounding
        )
        layer_dtype = tensors[next(iter(layers.values())).weight].dtype
        if layer_dtype in (torch.float16, torch.bfloat16):
            vera_A, vera_B = vera_A.to(layer_dtype).float(), vera_B.to(layer_dtype).float()
        return Projections(vera_A, vera_B, stored=False)
    need_in = max(layer.in_features for layer in layers.values())
    need_out = max(layer.out_features for layer in layers.values())
    if adapter.vera_A.shape[1] < need_in or adapter.vera_B.shape[0] < need_out:
        raise IncompatibleAdapterError(
            f"{adapter.path}: stored projections vera_A {list(adapter.vera_A.shape)} / vera_B "
            f"{list(adapter.vera_B.shape)} are too small for the base's layers (need in >= {need_in}, out >= "
            f"{need_out}); the adapter was trained on another model"
        )
    return Projections(adapter.vera_A, adapter.vera_B, stored=True)


def pin_projections(adapters: Sequence[VeraAdapter], plan: Plan) -> list[VeraAdapter]:
    """The adapters with the projections `plan` resolved for its checkpoint, as if they were stored.

    A model loaded in another dtype than its checkpoint (float32 or float64 for a reference) would otherwise
    regenerate projections without the rounding PEFT applies on the checkpoint's 16-bit dtype.
    """
    return [a.with_projections(plan.projections[a].vera_A, plan.projections[a].vera_B) for a in adapters]


def build_plan(
    adapters: Sequence[VeraAdapter], tensors: Mapping[str, TensorSpec], rounding: Rounding = Rounding.FMA
) -> Plan:
    """Resolve every adapter against the base's tensors; several adapters stack in the given order.

    Raises:
        IncompatibleAdapterError: An adapter does not fit the base, or a tensor is both folded and replaced.
    """
    plan = Plan()
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    for adapter in adapters:
        layers = match_layers(adapter, shapes)
        projections = resolve_projections(adapter, tensors, layers, rounding)
        plan.projections[adapter] = projections
        for module, target in layers.items():
            layer = adapter.layers[module]
            delta = LayerDelta(adapter.name, target, layer.lambda_b, layer.lambda_d, projections)
            plan.deltas.setdefault(target.weight, []).append(delta)
        plan.base_copies.update(adapter.base_copies)
        for name, tensor in adapter.replacements.items():
            if name in plan.replacements:
                plan.warnings.append(
                    f"{adapter.name} replaces {name} again; the last adapter's tensor is used"
                )
            plan.replacements[name] = tensor
        untrained = untrained_targets(adapter, shapes)
        if untrained:
            plan.warnings.append(
                f"{adapter.name}: target_modules matches {len(untrained)} layers without lambdas (left unchanged, "
                f"as PEFT does): {', '.join(untrained[:5])}{' ...' if len(untrained) > 5 else ''}"
            )
        plan.warnings.extend(f"{adapter.name}: {note}" for note in adapter.warnings)
    both = sorted(plan.deltas.keys() & plan.replacements.keys())
    if both:
        raise IncompatibleAdapterError(
            f"tensors {', '.join(both)} are both adapted and replaced by the adapters; merge them separately"
        )
    return plan
