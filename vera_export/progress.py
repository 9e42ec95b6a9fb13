"""Progress bars on stderr for long work, silent when turned off."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import click


@contextlib.contextmanager
def progress_bar(total: int, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield a function that advances a bar of `total` units (bytes) by its argument."""
    if not enabled:
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, width=30) as bar:
        yield bar.update
