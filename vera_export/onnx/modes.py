"""The export modes, one class each, holding everything that differs between them.

- **merged**: the adapters are folded into the weights by `layers.merge_into` (correctly rounded), and the graph
  is the plain model.
- **adapter**: each adapted layer is `layers.VeraLinear`, so the graph computes
  `W x + lambda_b * (B_s (lambda_d * (A_s x)))` with `A_s` / `B_s` sliced in the graph from the shared
  `vera.vera_A` / `vera.vera_B`, stored once. Every tensor the adapter trains is an overridable graph input with
  the adapter's values as default, so the graph runs as the exported adapter with only the tokens fed, and as
  another one with an ONNX Runtime adapter file.
- **bank**: the layers are `bank.VeraBankLinear` (and trained tensors `bank.RowSelected*`), holding the lambdas and
  trained tensors of all the adapters as tables `[n, ...]`; a third input, `adapter_index` (int64 `[batch]`), says
  which adapter each batch row runs. The tables are overridable inputs like adapter mode's, their leading axis
  declared symbolic, and a guard in front of the graph's first use of `adapter_index` makes ONNX Runtime fail on an
  index outside `[0, n)`.

Each mode says what it resolves from the adapters, the module it traces (and which of its tensors become graph
inputs), the graph's signature, what it does to the optimized graph, the verification's inputs and reference
models, and how many adapters an adapter file for it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import onnx_ir as ir
import torch
from torch import nn

from ..adapter import VeraAdapter
from ..errors import AdapterError
from ..io.index import ShardedTensorIndex
from ..layers import VeraLinear, apply_vera, merge_into, untie
from ..model_check import model_inputs
from ..options import ONNX_MODES, Rounding
from ..plan import Projections, build_plan, pin_projections
from . import graph as passes
from .bank import Bank, RowSelection, apply_bank, build_bank, stack_inputs
from .manifest import Manifest
from .signature import ADAPTER_INDEX, GraphInput, Signature, Task, lambda_input, tensor_input, token_signature


@dataclass
class Resolution:
    """What a mode resolved from the adapters against the base, before anything is loaded or written.

    Attributes:
        adapters: The adapters, their projections pinned to those resolved on the checkpoint's own dtypes (a
            model loaded in float32 must not regenerate them without the rounding PEFT applies on a 16-bit base).
        warnings: Things worth telling the user.
        projections: The shared projections the graph keeps (None when the adapters are merged).
        layers: The adapted modules the graph reads lambdas for.
        replaced: The base tensors the graph reads trained tensors for.
        bank: The bank, in bank mode.
    """

    adapters: list[VeraAdapter]
    warnings: list[str]
    projections: Projections | None = None
    layers: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    bank: Bank | None = None


class TaskOutput(nn.Module):
    """`forward(input_ids, attention_mask)` -> the task's output tensor: what the graph computes."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.output = task.output
        self.body = model.base_model if task.base_model else model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.body(input_ids=input_ids, attention_mask=attention_mask), self.output)


class BankTaskOutput(TaskOutput):
    """`forward(input_ids, attention_mask, adapter_index)` -> the task's output, row i run by adapter_index[i]."""

    def __init__(self, model: nn.Module, task: Task, selection: RowSelection) -> None:
        super().__init__(model, task)
        self.selection = selection

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter_index: torch.Tensor
    ) -> torch.Tensor:
        with self.selection.rows(adapter_index):
            return super().forward(input_ids, attention_mask)


# Row groups for the verification's references: which adapters compute which batch rows (None: all rows).
RowGroups = list[tuple[list[VeraAdapter], torch.Tensor | None]]


class ExportMode:
    """What every mode shares; each mode overrides what differs.

    Attributes:
        name: As `--mode` spells it.
        file_adapters: How many adapters an `onnx-adapter` file for the graph holds: 0 (no file: nothing is
            swappable), 1, or None for any number.
        stacked: The graph's trained tensors are tables with a leading adapter axis.
        fewer_layers_ok: An adapter file's adapters may adapt fewer layers than the graph (they get zeros).
    """

    name: ClassVar[str]
    file_adapters: ClassVar[int | None] = 0
    stacked: ClassVar[bool] = False
    fewer_layers_ok: ClassVar[bool] = False

    def resolve(
        self, index: ShardedTensorIndex, adapters: list[VeraAdapter], rounding: Rounding
    ) -> Resolution:
        """Check the adapters against the base's tensors and resolve what the graph needs of them.

        Raises:
            AdapterError, IncompatibleAdapterError: Before anything is loaded.
        """
        plan = build_plan(adapters, index.tensors, rounding)
        plan.check_base_copies(index.tensors)
        return Resolution(pin_projections(adapters, plan), list(plan.warnings))

    def signature(self, task: Task, dtype: torch.dtype = torch.float32) -> Signature:
        return token_signature(task, dtype)

    def module(
        self, model: nn.Module, resolution: Resolution, task: Task
    ) -> tuple[nn.Module, dict[int, str]]:
        """The module to trace (built from `model`, in place), and the graph input name by id of each of its
        tensors that becomes an overridable input."""
        raise NotImplementedError

    def after_optimize(self, graph: ir.Model, manifest: Manifest) -> None:
        """Changes to the optimized graph."""

    def verification_inputs(self, vocab_size: int, adapters: int) -> list[dict[str, torch.Tensor]]:
        """Fixed inputs of two shapes, the second row of a batch left-padded."""
        return model_inputs(vocab_size)

    def row_groups(self, batch: dict[str, torch.Tensor], adapters: list[VeraAdapter]) -> RowGroups:
        """Which adapters, applied unmerged, compute which rows of `batch` in the reference."""
        return [(adapters, None)]


class MergedMode(ExportMode):
    name = "merged"

    def module(
        self, model: nn.Module, resolution: Resolution, task: Task
    ) -> tuple[nn.Module, dict[int, str]]:
        return TaskOutput(merge_into(model, resolution.adapters), task), {}


class AdapterMode(ExportMode):
    name = "adapter"
    file_adapters = 1

    def resolve(
        self, index: ShardedTensorIndex, adapters: list[VeraAdapter], rounding: Rounding
    ) -> Resolution:
        if len(adapters) != 1:
            raise AdapterError(
                f"adapter mode exports exactly one adapter, got {len(adapters)}; export the others as adapter "
                f"files (vera-export onnx-adapter), serve them all from one graph with --mode bank, or fold them "
                f"all with --mode merged"
            )
        plan = build_plan(adapters, index.tensors, rounding)
        plan.check_base_copies(index.tensors)
        (adapter,) = adapters
        return Resolution(
            pin_projections(adapters, plan),
            list(plan.warnings),
            plan.projections[adapter],
            list(adapter.layers),
            list(adapter.replacements),
        )

    def module(
        self, model: nn.Module, resolution: Resolution, task: Task
    ) -> tuple[nn.Module, dict[int, str]]:
        (adapter,) = resolution.adapters
        # Untie first: the inputs must be the trained copies, not a tied partner's weights.
        untie(model, adapter.replacements)
        state = model.state_dict(keep_vars=True)
        names = {id(state[name]): tensor_input(name) for name in adapter.replacements}
        apply_vera(model, [adapter])
        for module, layer in model.named_modules():
            if isinstance(layer, VeraLinear):
                names[id(layer.lambda_b[0])] = lambda_input(module, "b")
                names[id(layer.lambda_d[0])] = lambda_input(module, "d")
        return TaskOutput(model, task), names


class BankMode(ExportMode):
    name = "bank"
    file_adapters = None
    stacked = True
    fewer_layers_ok = True  # a bank's file holds whole tables: a layer an adapter leaves alone gets zeros

    def resolve(
        self, index: ShardedTensorIndex, adapters: list[VeraAdapter], rounding: Rounding
    ) -> Resolution:
        bank = build_bank(adapters, index.tensors, rounding)
        return Resolution(
            bank.adapters, bank.warnings, bank.projections, list(bank.layers), list(bank.replaced), bank
        )

    def signature(self, task: Task, dtype: torch.dtype = torch.float32) -> Signature:
        return token_signature(task, dtype, (GraphInput(ADAPTER_INDEX, torch.int64, ("batch",), fill=0),))

    def module(
        self, model: nn.Module, resolution: Resolution, task: Task
    ) -> tuple[nn.Module, dict[int, str]]:
        bank = resolution.bank
        # Lambdas in float32, as PEFT holds them; trained tensors in the model's dtype, as the tensors they replace.
        lambdas = {lambda_input(m, "b"): (t.out_features,) for m, t in bank.layers.items()}
        lambdas |= {lambda_input(m, "d"): (bank.adapters[0].config.r,) for m in bank.layers}
        state = model.state_dict()
        replaced = {tensor_input(name): tuple(state[name].shape) for name in bank.replaced}
        dtype = next(model.parameters()).dtype
        stacked = stack_inputs(bank.adapters, lambdas, torch.float32) | stack_inputs(
            bank.adapters, replaced, dtype
        )
        tables = {name: nn.Parameter(table, requires_grad=False) for name, table in stacked.items()}
        module = BankTaskOutput(model, task, apply_bank(model, bank, tables))
        return module, {id(t): name for name, t in tables.items()}

    def after_optimize(self, graph: ir.Model, manifest: Manifest) -> None:
        passes.declare_adapters_axis(graph, manifest.overridable)
        passes.guard_adapter_index(graph, next(iter(manifest.overridable)))

    def verification_inputs(self, vocab_size: int, adapters: int) -> list[dict[str, torch.Tensor]]:
        """Every adapter in one batch of length 7, in reverse order (at least two rows, the second
        left-padded), then one row of length 16 run by adapter 0."""
        return bank_inputs(vocab_size, adapters)

    def row_groups(self, batch: dict[str, torch.Tensor], adapters: list[VeraAdapter]) -> RowGroups:
        index = batch[ADAPTER_INDEX]
        rows = ((k, (index == k).nonzero().flatten()) for k in range(len(adapters)))
        return [([adapters[k]], selected) for k, selected in rows if len(selected)]


MODES: dict[str, ExportMode] = {mode.name: mode for mode in (MergedMode(), AdapterMode(), BankMode())}
assert tuple(MODES) == ONNX_MODES


def bank_inputs(vocab_size: int, n: int) -> list[dict[str, torch.Tensor]]:
    """Fixed inputs for a bank of `n` adapters, with `adapter_index` (see `BankMode.verification_inputs`)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index, length in ((torch.arange(max(n, 2)).flip(0) % n, 7), (torch.zeros(1, dtype=torch.int64), 16)):
        input_ids = torch.randint(0, vocab_size, (len(index), length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1:2, : length // 3] = 0
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, ADAPTER_INDEX: index})
    return batches
