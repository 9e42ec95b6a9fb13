"""The reader and writer threads: order, errors, early stops, and no thread outliving its caller."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from vera_export.io.streams import BackgroundSink, prefetch


@pytest.fixture(autouse=True)
def _sigint(sigint_raises):
    """These tests interrupt themselves with SIGINT."""


def _worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vera-export-")]


def _interrupt_in(seconds: float) -> None:
    threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT)).start()


def test_prefetch_yields_in_order_and_raises_the_producers_error_in_place() -> None:
    assert list(prefetch(range(50))) == list(range(50))

    def failing():
        yield 1
        raise ValueError("reader failed")

    stream = prefetch(failing())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="reader failed"):
        next(stream)
    assert not _worker_threads()


def test_prefetch_stops_its_producer_when_the_consumer_stops() -> None:
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    for i in prefetch(items()):
        if i == 3:
            break
    assert not _worker_threads() and len(produced) < 10


def test_sink_consumes_in_order_and_reraises_the_consumers_error() -> None:
    seen = []
    with BackgroundSink(seen.append) as sink:
        for i in range(50):
            sink.put(i)
    assert seen == list(range(50))

    def consume(item):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), BackgroundSink(consume) as sink:
        for i in range(10):
            sink.put(i)
    assert not _worker_threads()


def test_an_interrupted_close_waits_for_the_writer_before_raising() -> None:
    """The writer may be writing into a file its caller closes next: it must be done when close() raises."""
    started, finished = threading.Event(), threading.Event()

    def consume(item):
        started.set()
        time.sleep(0.5)
        finished.set()

    sink = BackgroundSink(consume)
    sink.put(1)
    started.wait()
    _interrupt_in(0.1)
    with pytest.raises(KeyboardInterrupt):
        sink.close()
    assert finished.is_set() and not _worker_threads()


def test_an_interrupted_prefetch_waits_for_the_reader_before_raising() -> None:
    reading, finished = threading.Event(), threading.Event()

    def items():
        yield 0
        reading.set()
        time.sleep(0.5)  # reading the next tensor
        finished.set()
        yield 1

    stream = prefetch(items())
    next(stream)
    reading.wait()
    _interrupt_in(0.1)  # lands while closing the stream waits for the reader
    with pytest.raises(KeyboardInterrupt):
        stream.close()
    assert finished.is_set() and not _worker_threads()
