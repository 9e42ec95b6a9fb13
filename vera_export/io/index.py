"""A checkpoint's tensors: every shard of a Hugging Face model directory indexed, all headers validated first.

A 70B checkpoint does not fit in memory twice, so nothing here reads tensor data: `ShardedTensorIndex` knows
where every tensor lives, and `loader.LazyTensorLoader` reads them one at a time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError, listing, quoted
from .header import TensorInfo, parse_json, read_header

SAFE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _check_shard_name(index_path: Path, name: str) -> None:
    pure = PurePosixPath(name)
    # Lexical check only: Hugging Face cache snapshots are symlinks into ../../blobs, so resolving would fail.
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise CheckpointError(
            f"{index_path}: names shard {quoted(name)}, which is not a file inside the model directory; "
            f"shard names must be relative paths without '..' - fix or regenerate the index."
        )


class ShardedTensorIndex:
    """Every tensor of a safetensors checkpoint, single file or sharded, with all headers validated up front.

    Attributes:
        shards: The files, in index order (sorted by file name) or the single file.
        tensors: Every tensor by name, shard by shard in file order.
        index_metadata: The index's ``metadata`` when sharded (``{}`` if it has none), else None.
        root: The directory the shard names are relative to.
    """

    def __init__(
        self,
        headers: dict[Path, tuple[dict[str, TensorInfo], dict[str, str]]],
        index_metadata: dict | None = None,
        root: Path | None = None,
    ) -> None:
        """Builds an index from already validated headers; prefer `from_dir` or `from_file`.

        Args:
            headers: For each shard, what `read_header` returned for it.
            index_metadata: The ``metadata`` of ``model.safetensors.index.json``, or None for a single file.
            root: The model directory; by default the first shard's.
        """
        self.shards: list[Path] = list(headers)
        self.index_metadata = index_metadata
        self.root = root if root is not None else (self.shards[0].parent if self.shards else Path("."))
        self.tensors: dict[str, TensorInfo] = {}
        self._headers = headers
        for shard, (tensors, _) in headers.items():
            for name, info in tensors.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{shard}: tensor {quoted(name)} is also in {self.tensors[name].path}; "
                        f"a checkpoint must store each tensor once - re-save it."
                    )
                self.tensors[name] = info

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ShardedTensorIndex:
        """Indexes one safetensors file (e.g. ``adapter_model.safetensors``)."""
        path = Path(path)
        return cls({path: read_header(path)})

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> ShardedTensorIndex:
        """Indexes a Hugging Face model directory.

        Like transformers, a ``model.safetensors`` wins over ``model.safetensors.index.json`` when both exist.
        Shard files the index does not name are ignored, as transformers ignores them.

        Raises:
            CheckpointError: No safetensors weights, an invalid index, missing shards, or an index that
                disagrees with its shards.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CheckpointError(f"{model_dir}: not a directory; pass a Hugging Face model directory.")
        if (model_dir / SAFE_WEIGHTS_NAME).is_file():
            return cls.from_file(model_dir / SAFE_WEIGHTS_NAME)
        index_path = model_dir / INDEX_NAME
        if not index_path.is_file():
            raise _no_weights_error(model_dir)
        weight_map, index_metadata = _read_index(index_path)

        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (model_dir / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path}: names shards that are missing: {listing(missing)}; "
                f"the download is incomplete - download them again."
            )
        headers = {model_dir / name: read_header(model_dir / name) for name in shard_names}

        problems = []
        for name, shard_name in weight_map.items():
            if name not in headers[model_dir / shard_name][0]:
                problems.append(
                    f"tensor {quoted(name)} is listed for {shard_name} but that shard does not hold it"
                )
        for shard_name in shard_names:
            for name in headers[model_dir / shard_name][0]:
                if name not in weight_map:
                    problems.append(
                        f"{shard_name} holds tensor {quoted(name)}, which the index does not list"
                    )
                elif weight_map[name] != shard_name:
                    problems.append(
                        f"{shard_name} holds tensor {quoted(name)}, which the index puts in {weight_map[name]}"
                    )
        if problems:
            raise CheckpointError(
                f"{index_path}: the index and its shards disagree: {listing(problems)}; "
                f"re-download the checkpoint or re-save it."
            )
        return cls(headers, index_metadata, root=model_dir)

    @property
    def is_sharded(self) -> bool:
        """Whether the checkpoint came with a ``model.safetensors.index.json``."""
        return self.index_metadata is not None

    @property
    def weight_map(self) -> dict[str, str]:
        """Tensor name to shard file name, as an index file lists them."""
        return {name: self.shard_name(info.path) for name, info in self.tensors.items()}

    def shard_name(self, shard: Path) -> str:
        """The shard's name as the index gives it: its path relative to the model directory (usually a file name)."""
        return shard.relative_to(self.root).as_posix()

    def _shard(self, shard: str | os.PathLike[str]) -> Path:
        path = Path(shard)
        if path in self._headers:
            return path
        for candidate in self.shards:
            if candidate.name == str(shard):
                return candidate
        raise KeyError(f"{shard} is not a shard of this checkpoint; shards: {[str(s) for s in self.shards]}")

    def shard_tensors(self, shard: str | os.PathLike[str]) -> list[TensorInfo]:
        """The tensors of one shard (a path from `shards`, or its file name), in file order."""
        return list(self._headers[self._shard(shard)][0].values())

    def with_aliases(self, aliases: Mapping[str, str]) -> ShardedTensorIndex:
        """A copy in which each new name of `aliases` is a tensor of its own that reads the bytes of the stored one
        it maps to, placed right after it in its shard: a checkpoint that stores a tied pair once, seen as storing
        both (see `names`)."""
        if not aliases:
            return self
        after: dict[str, list[str]] = {}
        for alias, stored in aliases.items():
            after.setdefault(stored, []).append(alias)
        headers = {}
        for shard, (tensors, metadata) in self._headers.items():
            entries = {}
            for name, info in tensors.items():
                entries[name] = info
                for alias in after.get(name, []):
                    entries[alias] = dataclasses.replace(info, name=alias)
            headers[shard] = (entries, metadata)
        return ShardedTensorIndex(headers, self.index_metadata, self.root)

    def renamed(self, names: Mapping[str, str]) -> ShardedTensorIndex:
        """A copy in which each tensor named in `names` goes by its new name, in place (a checkpoint's keys as the
        model names them, see `names`)."""
        if not names:
            return self
        headers = {
            shard: (
                {names.get(n, n): dataclasses.replace(i, name=names.get(n, n)) for n, i in tensors.items()},
                meta,
            )
            for shard, (tensors, meta) in self._headers.items()
        }
        return ShardedTensorIndex(headers, self.index_metadata, self.root)

    def metadata(self, shard: str | os.PathLike[str]) -> dict[str, str]:
        """The ``__metadata__`` of one shard (a path from `shards`, or its file name)."""
        return dict(self._headers[self._shard(shard)][1])


def _no_weights_error(model_dir: Path) -> CheckpointError:
    message = f"{model_dir}: no safetensors weights (expected {SAFE_WEIGHTS_NAME} or {INDEX_NAME})"
    pickles = sorted(p.name for p in model_dir.glob("pytorch_model*.bin"))
    if pickles:
        message += (
            f"; it has {listing(pickles)}, a pickle, which is not loaded because unpickling can run "
            f"arbitrary code - convert it to safetensors (e.g. save_pretrained(..., safe_serialization=True))"
        )
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if "adapter_model.safetensors" in others:
        message += (
            "; it holds adapter_model.safetensors, a PEFT adapter's weights: pass the directory to --adapter"
        )
    elif others:
        message += (
            f"; other safetensors files are there ({listing(others)}): if one holds this model's weights, rename it "
            f"{SAFE_WEIGHTS_NAME}, or write a {INDEX_NAME} that lists them"
        )
    return CheckpointError(message + ".")


def _read_index(index_path: Path) -> tuple[dict[str, str], dict]:
    try:
        index = parse_json(index_path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot be read ({e.strerror or e}).") from e
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{index_path}: is not valid JSON ({e}); re-download it.") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: has no weight_map object listing the tensors; re-download it.")
    for name, shard_name in weight_map.items():
        if not isinstance(shard_name, str):
            raise CheckpointError(
                f"{index_path}: maps tensor {quoted(name)} to {quoted(shard_name)}, expected a file name."
            )
        _check_shard_name(index_path, shard_name)
    metadata = index.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{index_path}: metadata is a JSON {type(metadata).__name__}, expected an object."
        )
    return weight_map, metadata
