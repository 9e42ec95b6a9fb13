"""The package's shape, kept by tests: short modules, ONNX imported only under `onnx/`, nothing heavy on import,
lazy names that resolve to functions, and a test module for every package module at the mirrored path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "vera_export"
TESTS = ROOT / "tests"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
ONNX_LIBRARIES = {"onnx", "onnxruntime", "onnx_ir", "onnxscript"}
MAX_LINES = 400


def _mirror(module: Path) -> Path:
    """`vera_export/X.py` -> `tests/test_X.py`, `vera_export/io/X.py` -> `tests/io/test_X.py`."""
    relative = module.relative_to(PACKAGE)
    return TESTS / relative.parent / f"test_{relative.name}"


def _imported(path: Path) -> set[str]:
    """The top-level names of the absolute imports in a module (relative ones are the package's own)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_the_package_has_modules_in_each_folder() -> None:
    assert {m.parent.name for m in MODULES} == {"vera_export", "io", "onnx"} and len(MODULES) > 30


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_is_short_enough_to_read_in_one_sitting(module: Path) -> None:
    assert len(module.read_text().splitlines()) <= MAX_LINES


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_has_its_test_module_at_the_mirrored_path(module: Path) -> None:
    assert _mirror(module).is_file(), f"{module.relative_to(ROOT)} has no {_mirror(module).relative_to(ROOT)}"


def test_every_test_module_mirrors_a_package_module() -> None:
    """The other direction: no grab-bag test module beside the mirrored ones (end-to-end tests live in cli/)."""
    mirrored = {_mirror(m) for m in MODULES}
    stray = [
        p.relative_to(ROOT)
        for p in TESTS.rglob("test_*.py")
        if p not in mirrored and p.parent != TESTS / "cli" and p != Path(__file__)
    ]
    assert stray == []


def test_the_import_scan_sees_onnx_imports() -> None:
    """The scan below can fail: it finds the ONNX libraries where they are imported."""
    found = set().union(*(_imported(m) for m in MODULES if m.parent.name == "onnx"))
    assert {"onnx", "onnxruntime", "onnx_ir", "onnxscript"} <= found


@pytest.mark.parametrize(
    "module", [m for m in MODULES if m.parent.name != "onnx"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_module_outside_onnx_imports_an_onnx_library(module: Path) -> None:
    assert not _imported(module) & ONNX_LIBRARIES


def test_importing_the_package_loads_neither_torch_nor_onnx_runtime() -> None:
    code = "import vera_export, sys; print('onnxruntime' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "first",
    ["", "import vera_export.onnx.export; ", "from vera_export import onnx; "],
    ids=["alone", "after the module", "after the package"],
)
def test_top_level_onnx_names_are_the_functions(first: str) -> None:
    """The ONNX names load lazily; whatever was imported first, each is the function, never a submodule."""
    names = "export_onnx, onnx_adapter, verify_onnx"
    code = f"{first}from vera_export import {names}; assert all(callable(f) for f in ({names}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_public_name_loads() -> None:
    """Every name in `vera_export.__all__` resolves (lazily loaded names included) and `dir()` lists them."""
    import vera_export

    for name in vera_export.__all__:
        assert getattr(vera_export, name) is not None, name
    assert sorted(dir(vera_export)) == sorted(vera_export.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = vera_export.nothing
