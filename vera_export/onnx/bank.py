"""Adapter banks: one model serving a batch whose rows each run a different VeRA adapter.

Adapters of one base and one pair of projections differ only in what they train: two vectors per adapted layer,
plus trained biases and `modules_to_save` tensors. A bank stacks those per adapter into tables with a leading
adapter axis, and every layer picks its row of each table by the batch row's adapter index `k_i`:

- an adapted layer computes `W x_i + lambda_b[k_i] * (B_s (lambda_d[k_i] * (A_s x_i)))` (`VeraBankLinear`);
- a layer with trained tensors uses row `k_i` of their tables in place of its own (`RowSelectedLinear` for
  `nn.Linear` and GPT-2 `Conv1D`, `RowSelectedLayerNorm`).

What adapters of a bank must share, decided here (`build_bank`):

- the base, r and the projections themselves (`vera_A` / `vera_B` equal to the bit);
- the trained tensors: every adapter trains the same ones. A table row needs the adapter's own tensor; the base's
  value in its place would make an adapter file depend on the base, which `onnx-adapter` does not read;
- not the adapted layers: the bank adapts the union of the adapters' layers, and an adapter that does not adapt
  one of them has zero lambdas there. Its delta is then exactly zero, which is what PEFT computes for a layer it
  leaves alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapter import VeraAdapter
from ..errors import IncompatibleAdapterError, counted
from ..layers import vera_branch
from ..options import Rounding
from ..plan import Plan, Projections, TensorSpec, build_plan, pin_projections
from ..targets import TargetLayer
from .signature import lambda_input, tensor_input, trained_inputs


class RowSelection:
    """The adapter index of each batch row, shared by every layer of a bank while the model runs."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None

    @contextlib.contextmanager
    def rows(self, adapter_index: torch.Tensor) -> Iterator[None]:
        self.index = adapter_index
        try:
            yield
        finally:
            self.index = None

    def pick(self, table: torch.Tensor) -> torch.Tensor:
        """Each batch row's entry of `table` (`[n, *shape]`): `[batch, *shape]`."""
        if self.index is None:
            raise RuntimeError("a bank layer ran outside RowSelection.rows(); the model needs adapter_index")
        return table.index_select(0, self.index)

    def broadcast(self, table: torch.Tensor, ndim: int) -> torch.Tensor:
        """`pick(table)` shaped to broadcast over a tensor of `ndim` dims: batch first, the table's axes last."""
        rows = self.pick(table)
        return rows.reshape(rows.shape[:1] + (1,) * (ndim - rows.ndim) + rows.shape[1:])


class VeraBankLinear(nn.Module):
    """A linear layer with one VeRA adapter per batch row, chosen from tables of lambdas.

    `forward(x)[i] = base_layer(x)[i] + lambda_b[k_i] * (B_s (lambda_d[k_i] * (A_s x[i])))`, with
    `A_s = vera_A[:, :in]`, `B_s = vera_B[:out]` and `k_i` from `selection`, in the order PEFT computes one adapter.

    Args:
        base_layer: The layer to adapt (possibly a `RowSelectedLinear`); left unchanged.
        in_features: The layer's input size.
        out_features: The layer's output size.
        lambda_b: `[n, out_features]`, one row per adapter.
        lambda_d: `[n, r]`.
        vera_A: The shared, unsliced projection (r, max_in), referenced rather than copied.
        vera_B: The shared, unsliced projection (max_out, r).
        selection: The rows' adapter indices.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        in_features: int,
        out_features: int,
        lambda_b: nn.Parameter,
        lambda_d: nn.Parameter,
        vera_A: torch.Tensor,
        vera_B: torch.Tensor,
        selection: RowSelection,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.lambda_b = lambda_b
        self.lambda_d = lambda_d
        # Plain attributes, not buffers: the projections are shared by every layer and belong to no single one.
        self.projections = (vera_A, vera_B)
        self.selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        lambda_b = self.selection.broadcast(self.lambda_b, x.ndim)
        lambda_d = self.selection.broadcast(self.lambda_d, x.ndim)
        # In the lambdas' dtype (float32, as PEFT computes a 16-bit model's adapter), back to the layer's after.
        x = x.to(lambda_d.dtype)
        branch = vera_branch(x, lambda_b, lambda_d, *self.projections, self.in_features, self.out_features)
        return result + branch.to(result.dtype)


class _RowSelected(nn.Module):
    """A base layer whose weight and / or bias come per batch row from tables `[n, *tensor shape]`.

    Args:
        layer: The base layer; supplies whichever of weight and bias has no table.
        weight_table: `[n, *layer.weight.shape]`, or None to keep the layer's weight.
        bias_table: `[n, *layer.bias.shape]`, or None to keep the layer's bias.
        selection: The rows' adapter indices.
    """

    def __init__(
        self,
        layer: nn.Module,
        weight_table: nn.Parameter | None,
        bias_table: nn.Parameter | None,
        selection: RowSelection,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.weight_table = weight_table
        self.bias_table = bias_table
        self.selection = selection


class RowSelectedLinear(_RowSelected):
    """`nn.Linear` or GPT-2 `Conv1D` (which stores its weight `[in, out]`) with per-row weight and / or bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fan_in_fan_out = isinstance(self.layer, Conv1D)
        if self.weight_table is None:
            result = F.linear(x, self.layer.weight.T if fan_in_fan_out else self.layer.weight)
        else:
            weights = self.selection.pick(self.weight_table)  # [batch, *weight shape]
            weights = weights if fan_in_fan_out else weights.transpose(1, 2)  # [batch, in, out]
            rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, positions, in]
            result = torch.bmm(rows, weights).reshape(x.shape[:-1] + weights.shape[-1:])
        if self.bias_table is not None:
            return result + self.selection.broadcast(self.bias_table, x.ndim)
        return result if self.layer.bias is None else result + self.layer.bias


class RowSelectedLayerNorm(_RowSelected):
    """`nn.LayerNorm` whose weight and / or bias come per batch row from tables `[n, *normalized_shape]`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if self.weight_table is None:
            # The layer's own weight, and its bias too when that is not per row: F.layer_norm as the layer does it.
            bias = layer.bias if self.bias_table is None else None
            result = F.layer_norm(x, layer.normalized_shape, layer.weight, bias, layer.eps)
        else:
            result = F.layer_norm(x, layer.normalized_shape, None, None, layer.eps)
            result = result * self.selection.broadcast(self.weight_table, x.ndim)
            if self.bias_table is None and layer.bias is not None:
                result = result + layer.bias
        if self.bias_table is not None:
            result = result + self.selection.broadcast(self.bias_table, x.ndim)
        return result


# Module types whose trained tensors a bank selects per row, by the wrapper that does it.
ROW_SELECTED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: RowSelectedLinear,
    Conv1D: RowSelectedLinear,
    nn.LayerNorm: RowSelectedLayerNorm,
}


@dataclass(frozen=True)
class Bank:
    """Adapters that can share one bank, resolved against the base.

    Attributes:
        adapters: The adapters in bank order (row index k is `adapters[k]`), projections pinned.
        layers: The union of their adapted layers, by module path.
        replaced: The base tensors every adapter replaces (trained biases, `modules_to_save`).
        projections: The shared projections.
        warnings: Things worth telling the user.
    """

    adapters: list[VeraAdapter]
    layers: dict[str, TargetLayer]
    replaced: list[str]
    projections: Projections
    warnings: list[str]


def build_bank(
    adapters: Sequence[VeraAdapter], tensors: Mapping[str, TensorSpec], rounding: Rounding
) -> Bank:
    """Resolve each adapter against the base and check that they can share one bank.

    Raises:
        IncompatibleAdapterError: An adapter does not fit the base, or the adapters differ in their projections,
            their trained tensors or the layout of a layer; every difference is listed.
    """
    if not adapters:
        raise IncompatibleAdapterError("a bank needs at least one adapter")
    plans: list[Plan] = [build_plan([adapter], tensors, rounding) for adapter in adapters]
    for plan in plans:
        plan.check_base_copies(tensors)
    first, first_plan = adapters[0], plans[0]
    reference = first_plan.projections[first]
    replaced = list(first_plan.replacements)
    layers: dict[str, TargetLayer] = {}
    problems = []
    for adapter, plan in zip(adapters, plans):
        projections = plan.projections[adapter]
        if adapter.config.r != first.config.r:
            problems.append(f"{adapter.path}: r is {adapter.config.r}, {first.path}'s is {first.config.r}")
        elif not _same_projections(projections, reference):
            problems.append(
                f"{adapter.path}: projections vera_A / vera_B ({_source(adapter, projections)}) differ from "
                f"{first.path}'s ({_source(first, reference)})"
            )
        ours, theirs = set(plan.replacements), set(replaced)
        if ours != theirs:
            differences = [f"trains {_listed(ours - theirs)} that it does not"] if ours - theirs else []
            differences += [f"does not train {_listed(theirs - ours)} that it does"] if theirs - ours else []
            problems.append(
                f"{adapter.path}: unlike {first.path}, {' and '.join(differences)}; every adapter of a bank must "
                f"train the same tensors"
            )
        for deltas in plan.deltas.values():
            target = deltas[0].target
            known = layers.setdefault(target.module, target)
            if known != target:
                problems.append(
                    f"{adapter.path}: sees {target.module} as {_layout(target)}, another adapter as {_layout(known)}"
                )
    if problems:
        raise IncompatibleAdapterError(
            f"the adapters cannot share one bank ({counted(len(problems), 'problem')}): "
            + "; ".join(problems)
        )
    pinned = [pin_projections([a], plan)[0] for a, plan in zip(adapters, plans)]
    warnings = [w for plan in plans for w in plan.warnings]
    return Bank(pinned, layers, replaced, reference, warnings)


def stack_inputs(
    adapters: Sequence[VeraAdapter], shapes: Mapping[str, Sequence[int]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A bank's tables: for each graph input, the adapters' tensors stacked `[n, *shape]`, in `dtype`.

    An adapter without lambdas for a layer gets zeros there (its delta is then exactly zero, as PEFT leaves the
    layer alone). Trained tensors must be present in every adapter (`build_bank` checks that).
    """
    found = [trained_inputs(adapter) for adapter in adapters]
    tables = {}
    for name, shape in shapes.items():
        zeros = torch.zeros(tuple(shape), dtype=dtype) if name.endswith((".lambda_b", ".lambda_d")) else None
        tables[name] = torch.stack([f[name].to(dtype) if name in f else zeros for f in found])
    return tables


def _same_projections(ours: Projections, theirs: Projections) -> bool:
    return all(
        a.shape == b.shape and torch.equal(a.float(), b.float())
        for a, b in ((ours.vera_A, theirs.vera_A), (ours.vera_B, theirs.vera_B))
    )


def _source(adapter: VeraAdapter, projections: Projections) -> str:
    shapes = f"{list(projections.vera_A.shape)} / {list(projections.vera_B.shape)}"
    if projections.stored:
        return f"stored, {shapes}"
    return f"regenerated from projection_prng_key {adapter.config.projection_prng_key}, {shapes}"


def _layout(target: TargetLayer) -> str:
    layout = "[in, out]" if target.fan_in_fan_out else "[out, in]"
    return f"in {target.in_features}, out {target.out_features}, stored {layout}"


def _listed(names: set[str]) -> str:
    return "[" + ", ".join(sorted(names)) + "]"


def apply_bank(model: nn.Module, bank: Bank, tables: Mapping[str, nn.Parameter]) -> RowSelection:
    """Make `model` a bank in place: per-row tables in every adapted layer and every module with trained tensors.

    Args:
        model: The base model, in the dtype of `tables`.
        bank: From `build_bank`.
        tables: The tables by graph input name (`signature.lambda_input`, `signature.tensor_input`), each
            `[n, *shape]`; the module keeps these very objects, so they can be found again by identity.

    Returns:
        The selection to set around each forward (`with selection.rows(adapter_index): model(...)`).

    Raises:
        IncompatibleAdapterError: A trained tensor belongs to a module type a bank cannot select per row.
    """
    selection = RowSelection()
    owners: dict[str, dict[str, nn.Parameter]] = {}
    for tensor in bank.replaced:
        module, _, attribute = tensor.rpartition(".")
        owners.setdefault(module, {})[attribute] = tables[tensor_input(tensor)]
    unsupported = []
    for module, trained in owners.items():
        layer = model.get_submodule(module)
        wrapper = ROW_SELECTED.get(type(layer))
        if wrapper is None or not trained.keys() <= {"weight", "bias"}:
            unsupported.append(f"{', '.join(f'{module}.{a}' for a in trained)} ({type(layer).__name__})")
            continue
        _replace(model, module, wrapper(layer, trained.get("weight"), trained.get("bias"), selection))
    if unsupported:
        kinds = ", ".join(sorted({cls.__name__ for cls in ROW_SELECTED}))
        raise IncompatibleAdapterError(
            f"a bank selects trained tensors per row only in {kinds} modules, and the adapters train "
            f"{'; '.join(unsupported)}; export them one at a time (--mode adapter) or merged"
        )
    vera_A, vera_B = bank.projections.vera_A.float(), bank.projections.vera_B.float()
    for module, target in bank.layers.items():
        lambda_b, lambda_d = tables[lambda_input(module, "b")], tables[lambda_input(module, "d")]
        base_layer = model.get_submodule(module)
        layer = VeraBankLinear(
            base_layer, target.in_features, target.out_features, lambda_b, lambda_d, vera_A, vera_B, selection
        )
        _replace(model, module, layer)
    return selection


def _replace(model: nn.Module, module: str, layer: nn.Module) -> None:
    parent, _, child = module.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)
