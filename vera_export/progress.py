"""Progress bars on stderr for long work, silent when turned off."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

import click


@contextlib.contextmanager
def progress_bar(total: int, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield a function that advances a bar of `total` units (bytes, layers) by its argument."""
    if not enabled:
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, width=30) as bar:
        yield bar.update


@contextlib.contextmanager
def stage_bar(stages: Sequence[str], label: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yield a function that starts the named stage (one of `stages`, in order) on a bar of all of them.

    For work whose steps cannot be counted in units, such as tracing a model: the bar shows how many stages are
    done and which one is running.
    """
    if not enabled:
        yield lambda stage: None
        return
    with click.progressbar(
        length=len(stages), label=label, file=sys.stderr, show_eta=False, width=30, item_show_func=lambda s: s
    ) as bar:
        started = False

        def start(stage: str) -> None:
            nonlocal started
            if started:
                bar.update(1, stage)
            else:  # update(0) draws nothing: show the first stage by hand
                bar.current_item = stage
                bar.render_progress()
            started = True

        yield start
        bar.update(1, "done")
