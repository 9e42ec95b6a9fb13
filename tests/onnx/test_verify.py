"""`verify --onnx`: a good graph passes, and a wrong adapter, one lambda 1% off, a graph ONNX Runtime cannot load
or a bank row checked against another adapter fail."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import adapter_dir
from vera_export import AdapterError, CheckpointError
from vera_export.onnx.manifest import MANIFEST_NAME, Manifest
from vera_export.onnx.signature import VERA_A, lambda_input
from vera_export.onnx.verify import verify_onnx


def test_verify_onnx_catches_the_wrong_adapter(exports) -> None:
    export = exports["llama-adapter"]
    assert verify_onnx(export.directory, export.base, export.adapters).passed
    report = verify_onnx(export.directory, export.base, [adapter_dir(exports.root, "llama-qkv-b")])
    assert [c.passed for c in report.checks] == [True, False, False]
    merged = exports["llama-merged"]
    report = verify_onnx(merged.directory, merged.base, merged.adapters[:1])  # one of the two folded adapters
    assert not report.passed and all(not c.passed for c in report.checks if c.name.startswith("onnx "))


def test_verify_onnx_catches_one_lambda_one_percent_off(exports, tmp_path) -> None:
    export = exports["llama-adapter"]
    broken = tmp_path / "broken"
    shutil.copytree(export.directory, broken)
    model = onnx.load(str(broken / "model.onnx"))
    name = lambda_input("model.layers.1.self_attn.q_proj", "b")
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor) * np.float32(1.01), name))
    onnx.save(model, str(broken / "model.onnx"))
    report = verify_onnx(broken, export.base, export.adapters)
    assert [c.passed for c in report.checks] == [True, False, False]


def test_verify_onnx_reports_a_graph_onnx_runtime_cannot_load(exports, tmp_path) -> None:
    export = exports["llama-adapter"]
    broken = tmp_path / "broken"
    shutil.copytree(export.directory, broken)
    (broken / "model.onnx").write_bytes(b"not a graph")
    report = verify_onnx(broken, export.base, export.adapters)
    assert [(c.name, c.passed) for c in report.checks] == [("graph loads in ONNX Runtime", False)]
    assert "ONNX Runtime failed" in report.checks[0].detail


def test_verify_onnx_checks_each_row_against_its_adapter(banks) -> None:
    bank = banks["llama"]
    assert verify_onnx(bank.directory, bank.base, bank.adapters).passed
    # Given in another order, rows are checked against other adapters than they run, and fail.
    report = verify_onnx(bank.directory, bank.base, bank.adapters[::-1])
    assert [c.passed for c in report.checks] == [True, False, False]
    # Given only some of them, the other rows would go unchecked: refused.
    with pytest.raises(AdapterError, match="the bank holds 3 adapters and 1 were given"):
        verify_onnx(bank.directory, bank.base, bank.adapters[:1])


def _copy_with(export, tmp_path: Path, change) -> Path:
    """A copy of the export whose graph's initializers `change` edits (name -> array, in place)."""
    broken = tmp_path / "broken"
    shutil.copytree(export.directory, broken)
    model = onnx.load(str(broken / "model.onnx"))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    change(values)
    del model.graph.initializer[:]
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, n) for n, v in values.items())
    onnx.save(model, str(broken / "model.onnx"))
    return broken


def test_verify_onnx_catches_projections_other_than_the_manifest_s(exports, tmp_path: Path) -> None:
    export = exports["llama-adapter"]

    def nudge(values: dict) -> None:
        values[VERA_A] = values[VERA_A].copy()
        values[VERA_A][0, 0] = np.nextafter(values[VERA_A][0, 0], np.float32(1))  # one ulp of one element

    report = verify_onnx(_copy_with(export, tmp_path, nudge), export.base, export.adapters)
    graph_check = report.checks[0]
    assert not graph_check.passed and "differ from the projections the manifest records" in graph_check.detail


def test_verify_onnx_catches_overridable_inputs_other_than_the_manifest_s(exports, tmp_path: Path) -> None:
    export = exports["llama-adapter"]
    broken = tmp_path / "broken"
    shutil.copytree(export.directory, broken)
    manifest = Manifest.read(broken)
    name = lambda_input("model.layers.0.self_attn.q_proj", "b")
    manifest.overridable[name]["shape"] = [1]
    manifest.write(broken)
    report = verify_onnx(broken, export.base, export.adapters)
    assert not report.checks[0].passed and f"overridable inputs differ from {MANIFEST_NAME}'s: {name}" in (
        report.checks[0].detail
    )
    assert all(check.passed for check in report.checks[1:])  # the graph itself still computes the adapter


def test_verify_onnx_needs_an_export_and_a_base(exports, tmp_path: Path) -> None:
    export = exports["llama-adapter"]
    with pytest.raises(CheckpointError, match=f"no {MANIFEST_NAME}"):
        verify_onnx(tmp_path, export.base, export.adapters)
    with pytest.raises(CheckpointError, match="pass a Hugging Face model directory or a Hub ID to --base"):
        verify_onnx(export.directory, tmp_path / "missing", export.adapters)
