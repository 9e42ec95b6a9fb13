"""How the ONNX Runtime GenAI model builder names a decoder's projections, and how they map to the model's modules.

The builder names every projection after its module: layer i's `self_attn.q_proj` is the node
`/model/layers.{i}/attn/q_proj/MatMul` (`.../MatMul_Q4` once quantized to int4, its output keeping the name
`.../MatMul/output_0`), `mlp.down_proj` is `/model/layers.{i}/mlp/down_proj/MatMul`, `lm_head` is `/lm_head/MatMul`.
It packs and unpacks, too: q, k and v of a GroupQueryAttention graph become one `qkv_proj` (their outputs its
columns, in that order), while a checkpoint that stores them packed (Phi-3's `qkv_proj`, `gate_up_proj`) may
come out as separate projections (`gate_proj`, `up_proj`; q, k and v in float16 graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

# Packed projections and their members, in the order of the packed output's columns.
PACKINGS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Module scope in the model -> in the builder's node names.
_SCOPES = {"self_attn": "attn", "mlp": "mlp"}
_MATMULS = ("MatMul", "MatMulNBits")
LOGITS = "logits"


def split_module(module: str) -> tuple[str, str, str] | None:
    """`model.layers.3.self_attn.q_proj` -> (`model.layers.3.self_attn.`, `/model/layers.3/attn`, `q_proj`);
    `lm_head` -> (``, ``, `lm_head`); None for any other module outside the decoder layers' attention and MLP."""
    if module == "lm_head":
        return "", "", "lm_head"
    parts = module.split(".")
    if len(parts) != 5 or parts[:2] != ["model", "layers"] or parts[3] not in _SCOPES:
        return None
    return ".".join(parts[:4]) + ".", f"/model/layers.{parts[2]}/{_SCOPES[parts[3]]}", parts[4]


def split_stem(stem: str) -> tuple[str, str] | None:
    """`/model/layers.3/attn/q_proj` -> (`model.layers.3.self_attn.`, `q_proj`); `/lm_head` -> (``, `lm_head`)."""
    if stem == "/lm_head":
        return "", "lm_head"
    parts = stem.strip("/").split("/")
    scopes = {graph: model for model, graph in _SCOPES.items()}
    if len(parts) != 4 or parts[0] != "model" or not parts[1].startswith("layers.") or parts[2] not in scopes:
        return None
    return f"model.{parts[1]}.{scopes[parts[2]]}.", parts[3]


def projection(values: dict[str, ir.Value], scope: str, name: str) -> ir.Value | None:
    """The output of projection `name` in `scope`, if the graph has one. The head's output is the graph's
    `logits` itself."""
    output = values.get(f"{scope}/{name}/MatMul/output_0")
    if output is None and (scope, name) == ("", "lm_head"):
        output = values.get(LOGITS)
    node = None if output is None else output.producer()
    if node is None or node.op_type not in _MATMULS or not node.name.startswith(f"{scope}/{name}/MatMul"):
        return None
    return output


def width(output: ir.Value) -> int:
    """A projection's number of output columns, from its weight."""
    node = output.producer()
    if node.op_type == "MatMulNBits":
        return node.attributes["N"].value
    return node.inputs[1].shape[-1]


@dataclass(frozen=True)
class Piece:
    """A run of a module's output columns that lands in one projection of the graph.

    Attributes:
        output: The graph projection's output.
        start: Where the run starts in the module's output.
        width: How many columns it has.
        offset: Where it starts in the projection's output (non-zero in a packed projection).
    """

    output: ir.Value
    start: int
    width: int
    offset: int = 0


def pieces(values: dict[str, ir.Value], module: str, out_features: int, shapes: dict) -> list[Piece] | None:
    """Where a module's output columns are in the graph: in its own projection, in a packed one's columns, or,
    for a packed module, split over its members' projections. None when the naming leads nowhere.

    Args:
        values: The graph's values by name.
        module: The module's path in the model.
        out_features: Its number of outputs.
        shapes: The base checkpoint's tensor shapes (the widths of a packed projection's members).
    """
    split = split_module(module)
    if split is None:
        return None
    prefix, scope, name = split
    own = projection(values, scope, name)
    if own is not None:
        return [Piece(own, 0, out_features)] if width(own) == out_features else None
    for packed, members in PACKINGS.items():
        output = projection(values, scope, packed)
        if name in members and output is not None:
            widths = [shapes.get(f"{prefix}{member}.weight", (None,))[0] for member in members]
            if None in widths or sum(widths) != width(output):
                return None
            index = members.index(name)
            return [Piece(output, 0, out_features, sum(widths[:index]))]
    if name in PACKINGS:
        outputs = [projection(values, scope, member) for member in PACKINGS[name]]
        if None in outputs or sum(width(o) for o in outputs) != out_features:
            return None
        starts = [sum(width(o) for o in outputs[:k]) for k in range(len(outputs))]
        return [Piece(o, start, width(o)) for o, start in zip(outputs, starts)]
    return None


@dataclass(frozen=True)
class Slot:
    """Which rows of which model parameter a graph projection's output columns are.

    Attributes:
        parameter: The model's weight (`model.layers.0.self_attn.q_proj.weight`), `[out, in]`.
        rows: Its rows the projection computes.
        columns: The projection's output columns they are.
    """

    parameter: str
    rows: slice
    columns: slice


def slots(values: dict[str, ir.Value], stem: str, shapes: dict) -> list[Slot] | None:
    """The model weights a graph projection (`/model/layers.0/attn/qkv_proj`) computes with, or None.

    Args:
        values: The graph's values by name (to find a split module's other members).
        stem: The projection's node name without its `/MatMul` or `/MatMul_Q4`.
        shapes: The base checkpoint's tensor shapes.
    """
    split = split_stem(stem)
    if split is None:
        return None
    prefix, name = split
    if f"{prefix}{name}.weight" in shapes:
        return [Slot(f"{prefix}{name}.weight", slice(None), slice(None))]
    if name in PACKINGS:  # packed by the builder, separate in the checkpoint
        found, start = [], 0
        for member in PACKINGS[name]:
            rows = shapes.get(f"{prefix}{member}.weight", (None,))[0]
            if rows is None:
                return None
            found.append(Slot(f"{prefix}{member}.weight", slice(None), slice(start, start + rows)))
            start += rows
        return found
    packed = next((p for p, members in PACKINGS.items() if name in members), None)
    if packed is None or f"{prefix}{packed}.weight" not in shapes:
        return None
    start = 0  # a member of a module the checkpoint stores packed: its rows follow the members before it
    for member in PACKINGS[packed]:
        output = values.get(f"{stem.rsplit('/', 1)[0]}/{member}/MatMul/output_0")
        if output is None:
            return None
        if member == name:
            return [Slot(f"{prefix}{packed}.weight", slice(start, start + width(output)), slice(None))]
        start += width(output)
    return None
