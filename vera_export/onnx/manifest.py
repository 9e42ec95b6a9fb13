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
from ..errors import CheckpointError
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
        """Read `DIRECTORY/vera_export.json`.

        Raises:
            CheckpointError: The directory holds no export of this tool, or one of another format version.
        """
        path = Path(directory) / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(
                f"{path.parent}: no {MANIFEST_NAME}; point at a directory written by `vera-export onnx`"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"{path}: not a readable JSON file ({exc}); export the model again"
            ) from None
        if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
            raise CheckpointError(
                f"{path}: not a {FORMAT!r} manifest; export the model again with this version"
            )
        try:
            return cls(**raw)
        except TypeError as exc:
            raise CheckpointError(f"{path}: malformed manifest ({exc}); export the model again") from None

    def base_specs(self) -> dict[str, torch.Tensor]:
        """The base's tensors as meta tensors: their shapes and dtypes, without data."""
        return {
            name: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for name, (dtype, shape) in self.base_tensors.items()
        }


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
