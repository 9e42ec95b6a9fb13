"""Which base layers an adapter adapts, decided by PEFT's own matching rules over safetensors headers.

PEFT walks `model.named_modules()` and wraps every `nn.Linear` / `Conv1D` whose name matches `target_modules`
(`peft.tuners.tuners_utils.check_target_module_exists`). Here the module names come from the checkpoint's tensor
names, so no weights are loaded and no model is built: a module is a linear layer when it has a 2-D `weight`.
Whether that weight is stored `[out, in]` (`nn.Linear`) or `[in, out]` (GPT-2's `Conv1D`, `fan_in_fan_out`) is read
from the length of the layer's `lambda_b`, which is `out_features`; only square weights fall back to the config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import regex

from .adapter import VeraAdapter, VeraConfig
from .errors import AdapterError, IncompatibleAdapterError, counted, quoted


@dataclass(frozen=True)
class TargetLayer:
    """One adapted layer of the base model.

    Attributes:
        module: Module path, e.g. `model.layers.0.self_attn.q_proj`.
        weight: Name of the layer's weight tensor (`<module>.weight`).
        shape: Shape of the weight as stored.
        in_features: Input size of the layer.
        out_features: Output size of the layer.
        fan_in_fan_out: True when the weight is stored `[in, out]` (GPT-2 `Conv1D`).
    """

    module: str
    weight: str
    shape: tuple[int, int]
    in_features: int
    out_features: int
    fan_in_fan_out: bool


# One match of an adapter's pattern against one module name may take this long; a pattern that needs more
# backtracks catastrophically (PEFT itself hangs on it), and is refused.
MATCH_SECONDS = 0.5


def _match(field: str, pattern: str, module: str, full: bool = False) -> regex.Match | None:
    """`re.match` (or `re.fullmatch`) of an adapter config's pattern, bounded in time.

    Raises:
        AdapterError: The match takes longer than `MATCH_SECONDS`.
    """
    try:
        return (regex.fullmatch if full else regex.match)(pattern, module, timeout=MATCH_SECONDS)
    except TimeoutError:
        raise AdapterError(
            f"adapter_config.json: field {quoted(field)} holds a regular expression that takes over {MATCH_SECONDS} s "
            f"to match the module name {quoted(module)} (it backtracks catastrophically); simplify it"
        ) from None


def is_targeted(config: VeraConfig, module: str) -> bool:
    """PEFT's `check_target_module_exists` for a VeRA config, quirks included.

    A module named in full in a `target_modules` list is adapted whatever `layers_to_transform` says; only suffix
    matches are filtered by layer index, as in PEFT.

    Raises:
        AdapterError: One of the config's patterns takes too long to match (see `MATCH_SECONDS`).
    """
    if any(_match("modules_to_save", rf"(^|.*\.){name}($|\..*)", module) for name in config.modules_to_save):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        return _match("target_modules", targets, module, full=True) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{target}") for target in targets):
        return False
    layers = config.layers_to_transform
    if layers is None or layers == ():
        return True
    if not config.layers_pattern:
        match = regex.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for pattern in config.layers_pattern:
            match = _match("layers_pattern", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def linear_weights(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """Module path -> 2-D weight shape, for every module of the checkpoint that can be a linear layer."""
    return {
        name.removesuffix(".weight"): shape
        for name, shape in shapes.items()
        if name.endswith(".weight") and len(shape) == 2
    }


def module_names(tensors: Iterable[str]) -> list[str]:
    """Every module path the tensor names imply, containers included, as `named_modules()` would list them."""
    names: dict[str, None] = {}
    for tensor in tensors:
        parts = tensor.split(".")[:-1]
        for end in range(1, len(parts) + 1):
            names[".".join(parts[:end])] = None
    return list(names)


def match_layers(adapter: VeraAdapter, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, TargetLayer]:
    """Resolve every layer the adapter trains against the base checkpoint.

    Args:
        adapter: The loaded adapter.
        shapes: The base checkpoint's tensor shapes by name (from the safetensors headers).

    Returns:
        Target layers by module path, in the order of the adapter's lambdas.

    Raises:
        IncompatibleAdapterError: Listing every module that is missing from the base, has the wrong shape or is
            not targeted by the adapter's own config, and every replaced tensor that does not fit.
    """
    problems = incompatibilities(adapter, shapes)
    if problems:
        raise IncompatibleAdapterError(
            f"{adapter.path}: does not fit the base model ({counted(len(problems), 'problem')}): "
            + "; ".join(problems)
        )
    linear = linear_weights(shapes)
    return {module: _resolve(adapter, module, linear[module]) for module in adapter.layers}


def incompatibilities(adapter: VeraAdapter, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Everything that keeps the adapter from applying to this base, all at once (empty when it fits)."""
    linear = linear_weights(shapes)
    problems = []
    for module, layer in adapter.layers.items():
        shape = linear.get(module)
        if shape is None:
            problems.append(
                f"module {quoted(module)} has no 2-D weight in the base (was the adapter trained on another model?)"
            )
        elif layer.lambda_b.numel() not in shape:
            problems.append(
                f"{module}.vera_lambda_b has length {layer.lambda_b.numel()} but the base weight {module}.weight is "
                f"{list(shape)}"
            )
        elif not is_targeted(adapter.config, module):
            problems.append(f"module {quoted(module)} has lambdas but target_modules does not match it")
    problems.extend(_ambiguous_layouts(adapter, linear))
    for name, tensor in adapter.replacements.items():
        shape = shapes.get(name)
        if shape is None:
            problems.append(f"trained tensor {quoted(name)} has no counterpart in the base")
        elif tuple(tensor.shape) != tuple(shape):
            problems.append(
                f"trained tensor {quoted(name)} is {list(tensor.shape)} but the base has {list(shape)}"
            )
    return problems


def _ambiguous_layouts(adapter: VeraAdapter, linear: Mapping[str, tuple[int, int]]) -> list[str]:
    """A square weight's layout ([out, in] or [in, out]) comes from `fan_in_fan_out`; PEFT decides it per module
    type (Conv1D or nn.Linear) and saves one flag. Refuse when the adapter's other layers, whose lambda_b length
    tells their layout, show that the flag cannot be trusted."""
    layouts: dict[bool, list[str]] = {}
    square = []
    for module, layer in adapter.layers.items():
        shape = linear.get(module)
        if shape is None or layer.lambda_b.numel() not in shape:
            continue  # reported as a misfit already
        if shape[0] == shape[1]:
            square.append(module)
        else:
            layouts.setdefault(layer.lambda_b.numel() == shape[1], []).append(module)
    if not square or set(layouts) <= {adapter.config.fan_in_fan_out}:
        return []
    if len(layouts) == 2:
        found = (
            f"layers stored both ways ([in, out] like {layouts[True][0]}, [out, in] like {layouts[False][0]})"
        )
    else:
        found = f"layers stored {'[in, out]' if True in layouts else '[out, in]'} (like {next(iter(layouts.values()))[0]})"
    return [
        f"the adapter has {found} but fan_in_fan_out is {str(adapter.config.fan_in_fan_out).lower()}, so the "
        f"layout of its square layers ({', '.join(square[:3])}{' ...' if len(square) > 3 else ''}) is unknown; "
        f"adapt Conv1D and nn.Linear layers in separate adapters"
    ]


def untrained_targets(adapter: VeraAdapter, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Layers the config targets in this base that the adapter has no lambdas for (PEFT leaves them unchanged)."""
    linear = linear_weights(shapes)
    return [
        m
        for m in module_names(shapes)
        if m in linear and is_targeted(adapter.config, m) and m not in adapter.layers
    ]


def projection_dims(adapter: VeraAdapter, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    """`(max_in, max_out)` over the layers PEFT would target in this base: the shapes of regenerated projections."""
    linear = linear_weights(shapes)
    layers = [
        _resolve(adapter, m, linear[m])
        for m in module_names(shapes)
        if m in linear and is_targeted(adapter.config, m)
    ]
    if not layers:
        raise IncompatibleAdapterError(
            f"{adapter.path}: target_modules {quoted(adapter.config.target_modules)} matches no linear layer of the base"
        )
    return max(layer.in_features for layer in layers), max(layer.out_features for layer in layers)


def _resolve(adapter: VeraAdapter, module: str, shape: tuple[int, int]) -> TargetLayer:
    rows, cols = shape
    layer = adapter.layers.get(module)
    if layer is None or rows == cols:
        fan_in_fan_out = adapter.config.fan_in_fan_out
    else:
        fan_in_fan_out = layer.lambda_b.numel() == cols
    in_features, out_features = (rows, cols) if fan_in_fan_out else (cols, rows)
    return TargetLayer(module, f"{module}.weight", (rows, cols), in_features, out_features, fan_in_fan_out)
