"""Write an output, a directory or a single file, all at once or not at all.

Everything is written into a hidden sibling directory and renamed into place at the end, so an error, a full disk
or a kill (SIGKILL included) never leaves a partial result under the requested name, and the inputs are never
written to. With `force`, an existing output is swapped for the new one in a single atomic step where the
platform allows it (Linux `renameat2(RENAME_EXCHANGE)` for a directory, `rename(2)` for a file).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputError, VeraExportWarning

_STAGING_INFIX = ".tmp-"


@dataclass
class Placed:
    """The outputs this process put in place, and the work still running after them: what an interrupt leaves.

    Attributes:
        outputs: Every output renamed into place, in order (registered in the same signal-free step as the rename).
        pending: What the command is still doing after writing its output (its verification), or None.
    """

    outputs: list[Path] = field(default_factory=list)
    pending: str | None = None


PLACED = Placed()


@contextlib.contextmanager
def after_output(work: str) -> Iterator[None]:
    """Mark `work` (e.g. "its verification") as running after the output was put in place. An exception leaves
    the mark, for whoever reports it; `reset` clears it."""
    PLACED.pending = work
    yield
    PLACED.pending = None


def reset() -> None:
    """Forget the outputs placed and the work pending (a new command starts)."""
    PLACED.outputs.clear()
    PLACED.pending = None


def check_output(output: Path, inputs: Sequence[Path], force: bool, file: bool = False) -> None:
    """Refuse an output that is, holds or lies inside an input, or that exists (a directory: and is not empty)
    unless `force`.

    Raises:
        OutputError: Naming the output and what to do.
    """
    check_outside_inputs(output, inputs)
    if file:
        if output.is_dir():
            raise OutputError(f"{output}: is a directory; name the file to write")
        if output.exists() and not force:
            raise OutputError(f"{output}: exists; choose another file name or pass --force to replace it")
        return
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a directory; choose another output path")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OutputError(
            f"{output}: exists and is not empty; choose another output or pass --force to replace it"
        )


def check_outside_inputs(output: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output (directory or file) that is a symlink, or is, holds or lies inside an input.

    An input's files count where they really are: a Hugging Face cache snapshot links its files into `blobs/`,
    which an output must not replace either.

    Raises:
        OutputError: Naming the output and the input it overlaps.
    """
    if output.is_symlink():
        raise OutputError(f"{output}: is a symbolic link; name the real path, or another output")
    resolved = output.resolve()
    for source in inputs:
        real = {source.resolve()}
        if source.is_dir():
            real |= {path.resolve() for path in source.rglob("*") if path.is_symlink()}
        for path in real:
            if resolved == path or path in resolved.parents or resolved in path.parents:
                raise OutputError(
                    f"{output}: the output overlaps the input {path}; choose an output outside the inputs"
                )


@contextlib.contextmanager
def staged_output(
    output: str | Path, inputs: Sequence[Path], force: bool = False, fsync: bool = False, file: bool = False
) -> Iterator[Path]:
    """Yield a fresh staging directory (or, with `file`, a file path in one) that becomes `output` when the
    block succeeds.

    On any exception (and on KeyboardInterrupt or SystemExit) the staging directory is removed and `output` is
    left as it was. Writing errors (a full disk, permissions) become `OutputError`.

    Args:
        output: The directory (or file) to create.
        inputs: Paths the output must not overlap.
        force: Replace an existing (non-empty) `output`, only once the new one is complete.
        fsync: Flush every staged file and directory to disk before the rename, and the rename after it (for
            power-loss durability).
        file: The output is one file, written at the yielded path.

    Raises:
        OutputError: `output` overlaps an input, exists (and is not empty) without `force`, appeared meanwhile,
            or could not be written.
    """
    output = Path(output)
    check_output(output, inputs, force, file)
    _warn_stale(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}{_STAGING_INFIX}", dir=output.parent))
    except OSError as exc:
        what = "cannot be written" if file else "cannot create the output directory"
        raise OutputError(f"{output}: {what} ({exc.strerror}); choose a writable location") from None
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output gets the usual permissions
        try:
            yield staging / output.name if file else staging
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise OutputError(
                f"{output}: writing failed ({exc.strerror or exc}{where}); nothing was left under this name - "
                f"free some space or choose another output"
            ) from None
        if fsync:
            _fsync_tree(staging)
        with _signals_held():
            if file:
                _move_file_into_place(staging / output.name, output, force)
            else:
                _move_into_place(staging, output, force)
            PLACED.outputs.append(output)
            if fsync:
                _fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if file:
        shutil.rmtree(staging, ignore_errors=True)  # empty by now


def _move_file_into_place(staged: Path, output: Path, force: bool) -> None:
    if force:
        os.replace(staged, output)  # atomic, whether or not an output exists
        return
    try:
        # link(2) never replaces an existing file: a concurrent writer that finished first wins.
        os.link(staged, output)
    except FileExistsError:
        raise OutputError(
            f"{output}: another process wrote this file while this one ran; nothing of this run was left there"
        ) from None
    except OSError:  # a filesystem without hard links
        if output.exists():
            raise OutputError(f"{output}: another process wrote this file while this one ran") from None
        os.rename(staged, output)


def _move_into_place(staging: Path, output: Path, force: bool) -> None:
    if force and output.exists() and _exchange(staging, output):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous output
        return
    previous = None
    if force and output.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, previous / output.name)
    try:
        # rename(2) onto an empty directory replaces it, onto a non-empty one fails: a concurrent writer that
        # finished first wins, and this one says so instead of mixing files into its output.
        os.rename(staging, output)
    except OSError as exc:
        if previous is not None:
            os.replace(previous / output.name, output)
        raise OutputError(
            f"{output}: another process wrote this output while this one ran ({exc.strerror}); "
            f"nothing of this run was left there"
        ) from None
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def _warn_stale(output: Path) -> None:
    if not output.parent.is_dir():
        return
    stale = sorted(p.name for p in output.parent.glob(f".{output.name}{_STAGING_INFIX}*"))
    if stale:
        warnings.warn(
            f"{output.parent}: {', '.join(stale)} may be left from an interrupted run; delete them once no other "
            f"run writes {output.name}",
            VeraExportWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block is done, then act on the first one received.

    The swap into place and the removal of the previous output are never cut off half-way, and a signal that
    arrives meanwhile stops the run only once the complete new output is in place. Only the main thread can
    install handlers; elsewhere signals are not held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {
        signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in held
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        handler = previous[received[0]]
        if callable(handler):
            handler(received[0], None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), received[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root`, deepest first (side files included, not only the weights)."""
    for path in [*sorted(root.rglob("*"), reverse=True), root]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
