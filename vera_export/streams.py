"""Overlap reading, computing and writing: a reader thread ahead of the caller, a writer thread behind it.

Reads and writes spend their time in the kernel and torch's kernels release the GIL, so plain threads overlap
them with the fold. Queues of depth 1 keep at most one item waiting on each side: memory stays a few tensors.
"""

from __future__ import annotations

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
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                channel.put((item, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            channel.put((None, exc))
            return
        channel.put((_DONE, None))

    thread = threading.Thread(target=produce, name="vera-export-reader", daemon=True)
    thread.start()
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
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                channel.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


class BackgroundSink(Generic[T]):
    """Hand items to `consume`, in order, in a background thread; `close` waits for it and re-raises its error.

    Use as a context manager: leaving the block normally drains the queue; leaving it with an exception stops
    the consumer after its current item.
    """

    def __init__(self, consume: Callable[[T], None], depth: int = 1) -> None:
        self._consume = consume
        self._channel: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vera-export-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._channel.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._consume(item)
                except BaseException as exc:  # re-raised by put or close
                    self._error = exc

    def put(self, item: T) -> None:
        """Queue one item; raises the consumer's error as soon as one happened."""
        if self._error is not None:
            raise self._error
        self._channel.put(item)

    def close(self) -> None:
        self._channel.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> BackgroundSink[T]:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self._error = self._error or exc  # skip whatever is still queued
        self._channel.put(_DONE)
        self._thread.join()
