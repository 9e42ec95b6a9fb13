"""The files that travel with a model or adapter directory: config, generation config, tokenizer, README.

Every file is checked before the first byte of an output is written (`side_files`): a regular file, its size known,
so that a FIFO, a device or a link to one (`/dev/zero`) is refused up front instead of blocking, or filling the
disk, once the weights are written. Copying then takes exactly the bytes the check saw.
"""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
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
_CHUNK = 1024 * 1024
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


@dataclass
class SideFiles:
    """The files of `source` to copy, each with its size, and the weight files left out.

    Attributes:
        source: The input directory.
        files: Path relative to `source` -> size in bytes.
        skipped: Weight files of other formats, left out.
    """

    source: Path
    files: dict[Path, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        if not self.skipped:
            return []
        return [
            f"not copied (weights of another format would not match the merged ones): {', '.join(self.skipped)}"
        ]

    def copy(self, staging: Path) -> None:
        """Copy every file into `staging` at its relative path, exactly the bytes checked.

        Raises:
            CheckpointError: A file changed size since it was checked.
            OSError: Writing failed (a full disk): the staged output turns it into `OutputError`.
        """
        for relative, size in self.files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy(self.source / relative, target, size)


def side_files(source: Path, rewritten: Iterable[Path], skip_weights: bool = True) -> SideFiles:
    """Every file under `source` but those in `rewritten`, checked to be a regular file.

    Args:
        source: The input directory.
        rewritten: Files of `source` the output holds in a new form (its shards and index, an adapter's config
            and weights); compared by their real paths.
        skip_weights: Leave out (and report) other weight files, which would not match the rewritten ones.

    Raises:
        CheckpointError: A file that is not a regular one (a FIFO, a device, a socket, a broken link), named.
    """
    own = {path.resolve() for path in rewritten} | {(source / INDEX_NAME).resolve()}
    found = SideFiles(source)
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        try:
            mode = path.stat().st_mode  # through links: what would be copied
        except OSError as exc:
            raise CheckpointError(
                f"{path}: cannot be read ({exc.strerror or exc}, a broken link?); remove it from {source} or "
                f"restore the file it stands for"
            ) from None
        if stat.S_ISDIR(mode) or path.resolve() in own:
            continue
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            link = " (through a symbolic link)" if path.is_symlink() else ""
            raise CheckpointError(
                f"{path}: is {kind}{link}, not a file; only regular files travel with the output - remove it from "
                f"{source}"
            )
        if skip_weights and path.name.endswith(STALE_WEIGHT_SUFFIXES):
            found.skipped.append(str(relative))
            continue
        found.files[relative] = path.stat().st_size
    return found


def _copy(source: Path, target: Path, size: int) -> None:
    try:
        src = open(source, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CheckpointError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    with src, open(target, "wb") as dst:
        done = 0
        while done < size:
            chunk = src.read(min(_CHUNK, size - done))
            if not chunk:
                break
            dst.write(chunk)
            done += len(chunk)
        if done != size or src.read(1):
            raise CheckpointError(
                f"{source}: changed size while it was copied; copy the model again when it is not"
            )
    shutil.copystat(source, target)
