"""Overlap reading, computing and writing: a reader thread ahead of the caller, a writer thread behind it.

Reads and writes spend their time in the kernel and torch's kernels release the GIL, so plain threads overlap
them with the fold. Queues of depth 1 keep at most one item waiting on each side: memory stays a few tensors.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield `items`, produced by a background thread that runs at most `depth` items ahead.

    An exception raised while producing an item is raised here, in order. Stopping early (or an exception in
    the consumer) stops the producer after its current item.
    """
    channel: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                channel.put((item, None))
            channel.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            channel.put((None, exc))
        finally:
            done.set()

    threading.Thread(target=produce, name="vera-export-reader", daemon=True).start()
    try:
        while True:
            item, error = channel.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        _wait_for(done, unblock=lambda: _drop_one(channel))  # a producer may be waiting on a full queue


def _drop_one(channel: queue.Queue) -> None:
    with contextlib.suppress(queue.Empty):
        channel.get_nowait()


def _wait_for(done: threading.Event, unblock: Callable[[], None] = lambda: None) -> None:
    """Wait until a thread has set `done`, through interruptions (Ctrl-C); then re-raise the first of them.

    A thread left running after its caller gave up could still be reading or writing a file that the caller
    closes. An event, not `Thread.join`: on Python 3.11 and 3.12 a join interrupted by KeyboardInterrupt marks
    the thread as ended while it still runs.
    """
    interrupted: BaseException | None = None
    while not done.is_set():
        try:
            unblock()
            done.wait(timeout=0.05)
        except BaseException as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


class BackgroundSink(Generic[T]):
    """Hand items to `consume`, in order, in a background thread; `close` waits for it and re-raises its error.

    Use as a context manager: leaving the block normally drains the queue; leaving it with an exception stops
    the consumer after its current item.
    """

    def __init__(self, consume: Callable[[T], None], depth: int = 1) -> None:
        self._consume = consume
        self._channel: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, name="vera-export-writer", daemon=True).start()

    def _run(self) -> None:
        try:
            while True:
                item = self._channel.get()
                if item is _DONE:
                    return
                if self._error is None:
                    try:
                        self._consume(item)
                    except BaseException as exc:  # re-raised by put or close
                        self._error = exc
        finally:
            self._done.set()

    def put(self, item: T) -> None:
        """Queue one item; raises the consumer's error as soon as one happened."""
        if self._error is not None:
            raise self._error
        self._channel.put(item)

    def close(self) -> None:
        self._finish()
        if self._error is not None:
            raise self._error

    def _finish(self) -> None:
        """Send the end marker and wait for the thread, through interruptions, which are re-raised afterwards."""
        interrupted: BaseException | None = None
        while True:
            try:
                self._channel.put(_DONE)
                break
            except BaseException as exc:
                interrupted = interrupted or exc
                self._error = self._error or exc  # skip whatever is still queued
        try:
            _wait_for(self._done)
        except BaseException as exc:
            interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted

    def __enter__(self) -> BackgroundSink[T]:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self._error = self._error or exc  # skip whatever is still queued
        self._finish()
