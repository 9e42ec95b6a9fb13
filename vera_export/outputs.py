"""Write an output directory all at once or not at all.

Everything is written into a hidden sibling directory and renamed into place at the end, so a crash, a kill or a
full disk never leaves a partial checkpoint under the requested name, and the inputs are never written to.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import OutputError


def check_output(output: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse an output that is, holds or lies inside an input, or that exists and is not empty (unless force)."""
    resolved = output.resolve()
    for source in inputs:
        source = source.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise OutputError(
                f"{output}: the output overlaps the input {source}; choose an output directory outside the inputs"
            )
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a directory; choose another output path")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OutputError(f"{output}: exists and is not empty; choose another output or pass --force to replace it")


@contextlib.contextmanager
def staged_output(output: str | Path, inputs: Sequence[Path], force: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory that becomes `output` when the block succeeds.

    On any exception the staging directory is removed and `output` is left as it was. With `force`, an existing
    `output` is replaced only once the new one is complete.

    Raises:
        OutputError: `output` overlaps an input, or exists and is not empty without `force`.
    """
    output = Path(output)
    check_output(output, inputs, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should get the usual permissions
    try:
        yield staging
        _fsync_dir(staging)
        _move_into_place(staging, output, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, output: Path, force: bool) -> None:
    previous = None
    if output.exists() and force:
        previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, previous / output.name)
    try:
        # rename(2) onto an empty directory replaces it, onto a non-empty one fails: a concurrent writer that
        # finished first wins and this one reports it instead of mixing files into its output.
        os.rename(staging, output)
    except OSError as exc:
        if previous is not None:
            os.replace(previous / output.name, output)
            previous.rmdir()
        raise OutputError(f"{output}: could not be put in place ({exc.strerror}); another process wrote it meanwhile?") from None
    _fsync_dir(output.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
