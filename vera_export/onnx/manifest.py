"""`vera_export.json`: what an exported graph was built from, written next to `model.onnx`.

ONNX Runtime checks nothing when it loads an adapter file: a wrong name or shape fails at run time, and other
projections compute nonsense silently. So every export records the base's tensor shapes and dtypes, the
projections' r, key, shapes and SHA-256, the adapted layers, the replaced tensors and every overridable input,
and `onnx-adapter` and `verify --onnx` check against it without needing the base model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..adapter import VeraAdapter
from ..errors import CheckpointError, quoted
from ..options import ONNX_MODES, ONNX_PRECISIONS, ONNX_TASKS, Rounding
from ..plan import Projections

MANIFEST_NAME = "vera_export.json"
FORMAT = "vera-export onnx 1"


@dataclass
class Manifest:
    """What an exported graph was built from.

    Attributes:
        mode: `"merged"`, `"adapter"` or `"bank"`.
        task: The task the graph computes (`causal-lm`, `sequence-classification`, `feature-extraction`).
        output: The graph's output name (`logits` or `last_hidden_state`).
        opset: The ONNX opset.
        precision: `fp32`, `fp16` or `int4` (`signature.PRECISIONS`).
        adapters: The adapter directories exported, in order (in a bank, row k of every table is `adapters[k]`).
        rounding: The CPU rounding projections were regenerated with.
        base_tensors: The base checkpoint's tensors, name -> (dtype, shape): enough to match another adapter
            against the base exactly as `targets.match_layers` does, without the base.
        projections: Adapter and bank mode: r, projection_prng_key, the shapes of vera_A / vera_B and the SHA-256
            of their float32 values.
        layers: Adapter and bank mode: the adapted modules (in a bank, those of any of its adapters).
        replaced: Adapter and bank mode: the base tensors the adapters replace (trained biases, modules_to_save).
        overridable: Adapter and bank mode: every overridable graph input, name -> {"shape", "dtype"}; a bank's
            shapes start with `signature.ADAPTERS_AXIS`. Trained tensors the graph does not use (a classifier
            head in a feature-extraction graph) have none.
    """

    mode: str
    task: str
    output: str
    opset: int
    adapters: list[str]
    rounding: str
    base_tensors: dict[str, list]  # name -> [dtype, shape], as JSON holds them
    projections: dict | None = None
    layers: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    overridable: dict[str, dict] = field(default_factory=dict)
    precision: str = "fp32"

    def write(self, directory: Path) -> None:
        text = json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n"
        (directory / MANIFEST_NAME).write_text(text, encoding="utf-8")

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """Read `DIRECTORY/vera_export.json`, every field checked.

        Raises:
            CheckpointError: The directory holds no export of this tool, one of another format version, or a
                manifest whose fields are not what an export writes.
        """
        path = Path(directory) / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(
                f"{path.parent}: no {MANIFEST_NAME}; point at a directory written by `vera-export onnx`"
            ) from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise CheckpointError(
                f"{path}: not a readable JSON file ({reason}); export the model again"
            ) from None
        if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
            raise CheckpointError(
                f"{path}: not a {FORMAT!r} manifest; export the model again with this version"
            )
        try:
            manifest = cls(**raw)
        except TypeError as exc:
            raise CheckpointError(f"{path}: malformed manifest ({exc}); export the model again") from None
        problems = manifest.problems()
        if problems:
            raise CheckpointError(
                f"{path}: malformed manifest: {'; '.join(problems[:5])}; export the model again"
            )
        return manifest

    def problems(self) -> list[str]:
        """Every field whose value is not of the type and range an export writes."""
        problems = []

        def wrong(name: str, expected: str) -> None:
            problems.append(f"{name} is {quoted(getattr(self, name))}, expected {expected}")

        for name, choices in (
            ("mode", ONNX_MODES),
            ("task", ONNX_TASKS),
            ("precision", ONNX_PRECISIONS),
            ("rounding", tuple(r.value for r in Rounding)),
        ):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in choices:
                wrong(name, f"one of {choices}")
        if not isinstance(self.output, str):
            wrong("output", "a string")
        if not _is_int(self.opset) or self.opset < 1:
            wrong("opset", "a positive integer")
        for name in ("adapters", "layers", "replaced"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                wrong(name, "a list of strings")
        if not isinstance(self.base_tensors, dict) or not all(
            isinstance(k, str) and _is_spec(v) for k, v in self.base_tensors.items()
        ):
            problems.append("base_tensors is not name -> [dtype, shape] for every tensor")
        if not isinstance(self.overridable, dict) or not all(
            isinstance(k, str) and _is_input_spec(v) for k, v in self.overridable.items()
        ):
            problems.append("overridable is not input name -> {shape, dtype} for every input")
        if self.projections is not None and not _is_fingerprint(self.projections):
            problems.append("projections is not {r, projection_prng_key, vera_A, vera_B, sha256}")
        elif (self.mode == "merged") != (self.projections is None) and not problems:
            problems.append(
                f"projections are {'recorded' if self.projections else 'missing'} in {self.mode} mode"
            )
        return problems

    def base_specs(self) -> dict[str, torch.Tensor]:
        """The base's tensors as meta tensors: their shapes and dtypes, without data."""
        return {
            name: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for name, (dtype, shape) in self.base_tensors.items()
        }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_dtype(name: object) -> bool:
    return isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype)


def _is_spec(value: object) -> bool:
    """`[dtype, shape]` of a base tensor."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and _is_dtype(value[0])
        and isinstance(value[1], list)
        and all(_is_int(d) and d >= 0 for d in value[1])
    )


def _is_input_spec(value: object) -> bool:
    """`{"shape": [...], "dtype": ...}` of an overridable input (a bank's first axis is symbolic)."""
    return (
        isinstance(value, dict)
        and set(value) == {"shape", "dtype"}
        and _is_dtype(value["dtype"])
        and isinstance(value["shape"], list)
        and all((_is_int(d) and d >= 0) or isinstance(d, str) for d in value["shape"])
    )


def _is_fingerprint(value: object) -> bool:
    keys = {"r", "projection_prng_key", "vera_A", "vera_B", "sha256"}
    if not isinstance(value, dict) or not keys <= set(value) or not set(value) <= keys | {"graph_sha256"}:
        return False
    shapes = all(
        isinstance(value[k], list) and len(value[k]) == 2 and all(_is_int(d) and d > 0 for d in value[k])
        for k in ("vera_A", "vera_B")
    )
    digests = all(
        isinstance(value[k], str) and len(value[k]) == 64 and set(value[k]) <= set("0123456789abcdef")
        for k in ("sha256", "graph_sha256")
        if k in value
    )
    return (
        _is_int(value["r"])
        and value["r"] > 0
        and _is_int(value["projection_prng_key"])
        and shapes
        and digests
    )


def projection_digest(vera_A: torch.Tensor, vera_B: torch.Tensor) -> str:
    """SHA-256 of the float32 values of `vera_A`, then `vera_B`."""
    digest = hashlib.sha256()
    for tensor in (vera_A, vera_B):
        digest.update(tensor.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def projection_fingerprint(adapter: VeraAdapter, projections: Projections) -> dict:
    """r, key, shapes and digest of an adapter's projections: what another adapter must match."""
    return {
        "r": adapter.config.r,
        "projection_prng_key": adapter.config.projection_prng_key,
        "vera_A": list(projections.vera_A.shape),
        "vera_B": list(projections.vera_B.shape),
        "sha256": projection_digest(projections.vera_A, projections.vera_B),
    }
