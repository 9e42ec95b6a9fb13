"""Copy the files that travel with a model or adapter directory: config, generation config, tokenizer, README."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from .index import INDEX_NAME

# Weight files other than the checkpoint's own shards hold unmerged weights; copying them would ship a stale model
# next to the merged one.
STALE_WEIGHT_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".onnx_data",
    ".safetensors",
    ".index.json",
)


def copy_side_files(
    source: Path, staging: Path, rewritten: Iterable[Path], skip_weights: bool = True
) -> list[str]:
    """Copy every file under `source` into `staging` at the same relative path, except those in `rewritten`.

    Args:
        source: The input directory.
        staging: The output directory being written.
        rewritten: Files of `source` the output holds in a new form (its shards and index, an adapter's config
            and weights); compared by their real paths.
        skip_weights: Leave out (and report) other weight files, which would not match the rewritten ones.

    Returns:
        Warnings: the weight files left out, if any.
    """
    own = {path.resolve() for path in rewritten} | {(source / INDEX_NAME).resolve()}
    skipped = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or path.resolve() in own:
            continue
        if skip_weights and path.name.endswith(STALE_WEIGHT_SUFFIXES):
            skipped.append(str(relative))
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    if skipped:
        return [
            f"not copied (weights of another format would not match the merged ones): {', '.join(skipped)}"
        ]
    return []
