"""VeRA on a loaded `torch.nn.Module` without PEFT: the unmerged forward, and merge / unmerge in place."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import VeraAdapter, load_adapter
from .errors import CheckpointError
from .fold import fold
from .plan import Plan, build_plan
from .projections import Rounding


def vera_branch(
    x: torch.Tensor,
    lambda_b: torch.Tensor,
    lambda_d: torch.Tensor,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    """`lambda_b * (B_s (lambda_d * (A_s x)))` with `A_s = vera_A[:, :in]`, `B_s = vera_B[:out]`: VeRA's path, in
    the order PEFT's `vera.Linear.forward` computes it (the lambdas may carry broadcast axes, as a bank's do)."""
    sliced_A, sliced_B = vera_A[:, :in_features], vera_B[:out_features, :]
    return lambda_b * F.linear(lambda_d * F.linear(x, sliced_A), sliced_B)


def _adapter_dtype(tensor: torch.Tensor) -> torch.Tensor:
    # PEFT loads adapters with autocast_adapter_dtype=True: 16-bit adapter tensors run in float32.
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class VeraLinear(nn.Module):
    """A linear layer (`nn.Linear` or GPT-2 `Conv1D`) with one or more VeRA adapters applied unmerged.

    `forward(x) = base_layer(x) + sum_k lambda_b_k * (B_k (lambda_d_k * (A_k x)))`, with `A_k = vera_A[:, :in]`
    and `B_k = vera_B[:out]`, computed as PEFT's `vera.Linear.forward` computes it.

    Args:
        base_layer: The layer to adapt; left unchanged.
        in_features: The layer's input size.
        out_features: The layer's output size.
        adapters: Per adapter, `(lambda_b, lambda_d, vera_A, vera_B)`; the projections are the shared, unsliced
            tensors, referenced rather than copied, already on the layer's device and in float32 or float64.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        in_features: int,
        out_features: int,
        adapters: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        device = next(base_layer.parameters()).device
        self.lambda_b = nn.ParameterList(
            [nn.Parameter(_adapter_dtype(a[0]).to(device), False) for a in adapters]
        )
        self.lambda_d = nn.ParameterList(
            [nn.Parameter(_adapter_dtype(a[1]).to(device), False) for a in adapters]
        )
        # Plain attributes, not buffers: the projections are shared by every layer and belong to no single one.
        self.projections = [(a[2], a[3]) for a in adapters]

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as PEFT's layers expose it (T5's feed-forward reads `wo.weight.dtype`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous_dtype = x.dtype
        result = self.base_layer(x)
        result_dtype = result.dtype
        for lambda_b, lambda_d, (vera_A, vera_B) in zip(self.lambda_b, self.lambda_d, self.projections):
            x = x.to(lambda_d.dtype)
            branch = vera_branch(
                x,
                lambda_b,
                lambda_d,
                vera_A.to(x.device),
                vera_B.to(x.device),
                self.in_features,
                self.out_features,
            )
            result = result + branch
        return result.to(result_dtype).to(previous_dtype)


def apply_vera(
    model: nn.Module, adapters: Sequence[str | Path | VeraAdapter], rounding: Rounding = Rounding.FMA
) -> nn.Module:
    """Wrap every layer the adapters target with `VeraLinear` and copy in their trained biases and heads.

    The result computes what PEFT's unmerged VeRA model computes, with all the adapters active.

    Args:
        model: A loaded model, e.g. from `AutoModelForCausalLM.from_pretrained`; modified in place.
        adapters: Adapter directories or loaded adapters.
        rounding: Which CPU kernel's rounding to reproduce when regenerating projections.

    Returns:
        `model`.
    """
    plan = _plan(model, adapters, rounding)
    plan.check_base_copies(model.state_dict())
    _copy_replacements(model, plan)  # before wrapping, while tensor names are still the base's
    shared: dict[tuple[int, torch.device], torch.Tensor] = {}

    def on(device: torch.device, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # One copy of each projection per device, shared by all layers there, in the lambdas' dtype.
        key = (id(tensor), device)
        if key not in shared:
            shared[key] = tensor.to(device, _adapter_dtype(like).dtype)
        return shared[key]

    for deltas in plan.deltas.values():
        target = deltas[0].target
        base_layer = model.get_submodule(target.module)
        device = next(base_layer.parameters()).device
        projections = [
            (
                d.lambda_b,
                d.lambda_d,
                on(device, d.projections.vera_A, d.lambda_d),
                on(device, d.projections.vera_B, d.lambda_d),
            )
            for d in deltas
        ]
        wrapped = VeraLinear(base_layer, target.in_features, target.out_features, projections)
        parent_name, _, child = target.module.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapped)
    return model


@torch.no_grad()
def merge_into(
    model: nn.Module, adapters: Sequence[str | Path | VeraAdapter], rounding: Rounding = Rounding.FMA
) -> nn.Module:
    """Fold the adapters into a loaded model's weights in place, correctly rounded (see `fold.fold`).

    Trained biases and `modules_to_save` tensors are copied into the model.
    """
    plan = _plan(model, adapters, rounding)
    _fold_in_place(model, plan, alpha=1.0)
    _copy_replacements(model, plan)
    return model


@torch.no_grad()
def unmerge_from(
    model: nn.Module, adapters: Sequence[str | Path | VeraAdapter], rounding: Rounding = Rounding.FMA
) -> nn.Module:
    """Subtract the adapters' deltas from a merged model's weights in place.

    Tensors a merge replaced (trained biases, `modules_to_save`) stay as they are: the base's values are gone.
    """
    _fold_in_place(model, _plan(model, adapters, rounding), alpha=-1.0)
    return model


def _plan(model: nn.Module, adapters: Sequence[str | Path | VeraAdapter], rounding: Rounding) -> Plan:
    loaded = [load_adapter(a) for a in adapters]
    return build_plan(loaded, model.state_dict(keep_vars=True), rounding)


def _fold_in_place(model: nn.Module, plan: Plan, alpha: float) -> None:
    plan.check_foldable(model.state_dict(keep_vars=True))
    if alpha > 0:
        plan.check_base_copies(model.state_dict())
        untie(model, plan.deltas)  # a tied head's delta is the head's alone, as in PEFT's forward
    for name, deltas in plan.deltas.items():
        weight = model.get_parameter(name)
        try:
            fold(weight.data, [d.delta(weight.device) for d in deltas], alpha=alpha, out=weight.data)
        except FloatingPointError as exc:
            raise CheckpointError(f"{name}: the merge {exc}; check the adapter's lambdas") from None


def untie(model: nn.Module, names: Iterable[str]) -> None:
    """Give each named parameter storage of its own where the model shares it with another module.

    A `modules_to_save` copy of an input embedding that the model ties to its output head (tied word embeddings)
    replaces the embedding only: in PEFT the head keeps the original weights.
    """
    uses = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    for name in names:
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        param = getattr(module, attribute)
        if isinstance(param, nn.Parameter) and uses[id(param)] > 1:
            setattr(
                module, attribute, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            )
            _untie_config(getattr(model, "config", None))


def _untie_config(config: object) -> None:
    """Say so in the model's config, so that `save_pretrained` stores both tensors and loading does not tie them
    again (a multimodal model's text config included)."""
    if config is None:
        return
    for part in (config, *(getattr(config, key) for key in ("text_config",) if hasattr(config, key))):
        if hasattr(part, "tie_word_embeddings"):
            part.tie_word_embeddings = False


def _copy_replacements(model: nn.Module, plan: Plan) -> None:
    untie(model, plan.replacements)
    state = model.state_dict(keep_vars=True)
    for name, tensor in plan.replacements.items():
        state[name].data.copy_(tensor.to(state[name].dtype))
