"""`vera_export.json`: written and read back as it was, a foreign or malformed one refused, and what it records of
the base and the projections enough to check an adapter without the base."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import adapter_dir
from vera_export.adapter import load_adapter
from vera_export.errors import CheckpointError
from vera_export.io.index import ShardedTensorIndex
from vera_export.onnx.manifest import (
    FORMAT,
    MANIFEST_NAME,
    Manifest,
    projection_digest,
    projection_fingerprint,
)
from vera_export.plan import Projections, build_plan


def _manifest(**changes) -> Manifest:
    values = dict(
        mode="adapter",
        task="causal-lm",
        output="logits",
        opset=18,
        adapters=["/adapters/a"],
        rounding="fma",
        base_tensors={"w": ["bfloat16", [4, 3]], "ids": ["int64", [7]], "scalar": ["float32", []]},
        projections={
            "r": 2,
            "projection_prng_key": 0,
            "vera_A": [2, 3],
            "vera_B": [4, 2],
            "sha256": "ab" * 32,
        },
        layers=["layer"],
        replaced=["layer.bias"],
        overridable={"vera.layer.lambda_b": {"shape": [4], "dtype": "float32"}},
    )
    return Manifest(**{**values, **changes})


def test_a_manifest_reads_back_as_written(tmp_path: Path) -> None:
    manifest = _manifest()
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["format"] == FORMAT
    merged = _manifest(mode="merged", projections=None, layers=[], replaced=[], overridable={})
    merged.write(tmp_path)
    assert Manifest.read(str(tmp_path)) == merged


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, f"no {MANIFEST_NAME}; point at a directory written by `vera-export onnx`"),
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", f"not a {FORMAT!r} manifest"),
        (json.dumps({"mode": "adapter"}), f"not a {FORMAT!r} manifest"),
        (
            json.dumps({"format": "vera-export onnx 0", "mode": "adapter"}),
            "export the model again with this version",
        ),
        (json.dumps({"format": FORMAT, "mode": "adapter"}), "malformed manifest"),
        (
            json.dumps({"format": FORMAT, **dataclasses.asdict(_manifest()), "extra": 1}),
            "malformed manifest (Manifest.__init__() got an unexpected keyword argument 'extra')",
        ),
    ],
    ids=[
        "missing",
        "not JSON",
        "a list",
        "no format",
        "another format",
        "fields missing",
        "a field too many",
    ],
)
def test_a_foreign_or_malformed_manifest_is_a_checkpoint_error(
    tmp_path: Path, content: str | None, fragment: str
) -> None:
    if content is not None:
        (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(CheckpointError) as caught:
        Manifest.read(tmp_path)
    assert str(tmp_path) in str(caught.value) and fragment in str(caught.value)


def test_a_manifest_without_a_precision_is_float32(tmp_path: Path) -> None:
    """Graphs exported before precisions existed are float32."""
    fields = dataclasses.asdict(_manifest())
    del fields["precision"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": FORMAT, **fields}))
    assert Manifest.read(tmp_path).precision == "fp32"


def test_base_specs_are_meta_tensors_of_the_recorded_shapes_and_dtypes(tmp_path: Path) -> None:
    _manifest().write(tmp_path)
    specs = Manifest.read(tmp_path).base_specs()
    assert {n: (t.device.type, t.dtype, tuple(t.shape)) for n, t in specs.items()} == {
        "w": ("meta", torch.bfloat16, (4, 3)),
        "ids": ("meta", torch.int64, (7,)),
        "scalar": ("meta", torch.float32, ()),
    }


def test_an_export_records_the_base_and_the_projections(exports) -> None:
    export = exports["llama-adapter"]
    manifest = Manifest.read(export.directory)
    index = ShardedTensorIndex.from_dir(export.base)
    specs = manifest.base_specs()
    assert {n: (t.dtype, tuple(t.shape)) for n, t in specs.items()} == {
        n: (i.dtype, i.shape) for n, i in index.tensors.items()
    }
    adapter = load_adapter(export.adapters[0])
    projections = build_plan([adapter], index.tensors).projections[adapter]
    assert manifest.projections == projection_fingerprint(adapter, projections)
    assert (manifest.mode, manifest.adapters, manifest.layers) == (
        "adapter",
        [str(export.adapters[0])],
        list(adapter.layers),
    )


def test_the_digest_is_of_the_float32_values_in_order(fixture_root: Path) -> None:
    adapter = load_adapter(adapter_dir(fixture_root, "llama-qv"))
    vera_A, vera_B = adapter.vera_A, adapter.vera_B
    digest = projection_digest(vera_A, vera_B)
    assert len(digest) == 64 and digest == projection_digest(vera_A.T.contiguous().T, vera_B.clone())
    assert projection_digest(vera_A.bfloat16(), vera_B) == projection_digest(
        vera_A.bfloat16().float(), vera_B
    )
    nudged = vera_A.clone()
    nudged[3, 5] = torch.nextafter(nudged[3, 5], torch.tensor(1.0))
    assert projection_digest(nudged, vera_B) != digest  # one ulp of one element
    assert projection_digest(vera_B, vera_A) != digest  # the order is part of it
    fingerprint = projection_fingerprint(adapter, Projections(vera_A, vera_B, stored=True))
    assert fingerprint == {
        "r": 8,
        "projection_prng_key": adapter.config.projection_prng_key,
        "vera_A": list(vera_A.shape),
        "vera_B": list(vera_B.shape),
        "sha256": digest,
    }


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from([f.name for f in dataclasses.fields(Manifest)]), value=_JSON)
def test_fuzzed_manifest_fields_end_in_our_error_or_a_valid_manifest(
    tmp_path: Path, field: str, value
) -> None:
    """Any value of any field: Manifest.read gives a CheckpointError, or a manifest whose fields are all valid
    (which onnx-adapter then uses without a crash)."""
    raw = {"format": FORMAT, **dataclasses.asdict(_manifest()), field: value}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    try:
        manifest = Manifest.read(tmp_path)
    except CheckpointError as exc:
        assert str(tmp_path) in str(exc) and len(str(exc)) < 3000
    else:
        assert manifest.problems() == []
        manifest.base_specs()
