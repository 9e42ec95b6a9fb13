"""Session fixtures: the tiny models and adapters of fixtures/build.py, built once."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import transformers

from fixtures.build import build_all


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fixtures")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_all(root)
    return root

