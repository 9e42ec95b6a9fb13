"""Fixtures for every test: the tiny models and adapters of fixtures/build.py (built once per session), private
copies of one pair to break, and Ctrl-C that raises."""

from __future__ import annotations

import shutil
import signal
import warnings
from pathlib import Path

import pytest
import transformers

from fixtures.build import build_all
from tests.helpers import adapter_dir, base_dir


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fixtures")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_all(root)
    return root


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt in this test, even where the suite was started with SIGINT ignored (a
    background job of a non-interactive shell, as some CI runners start it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def work(fixture_root: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """`(tmp_path, base, adapter)`: private copies of llama-qv's base and adapter that a test may break."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(base_dir(fixture_root, "llama-qv"), base)
    shutil.copytree(adapter_dir(fixture_root, "llama-qv"), adapter)
    return tmp_path, base, adapter
