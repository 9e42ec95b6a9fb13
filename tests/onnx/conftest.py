"""Session fixtures of the ONNX tests: graphs are exported once for every module that reads them (5 to 15 s each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.onnx.helpers import Banks, Exports, Packages, Siblings


@pytest.fixture(scope="session")
def siblings(fixture_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Siblings:
    return Siblings(fixture_root, tmp_path_factory.mktemp("siblings"))


@pytest.fixture(scope="session")
def exports(fixture_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return Exports(fixture_root, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="session")
def banks(siblings: Siblings, tmp_path_factory: pytest.TempPathFactory) -> Banks:
    return Banks(siblings, tmp_path_factory.mktemp("banks"))


@pytest.fixture(scope="session")
def packages(fixture_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return Packages(fixture_root, tmp_path_factory.mktemp("genai"))
