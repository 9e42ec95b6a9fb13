"""The saved graph: its interface, the shared projections stored once and never folded into copies, trained
tensors as overridable inputs, and the guard that refuses an adapter index out of range."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.onnx.helpers import ADAPTER_EXPORTS, BANK_SPECS, bank_batches, vocab_size
from vera_export.errors import OutputError
from vera_export.onnx.graph import DATA_NAME, INDEX_GUARD, MODEL_NAME, needs_external_data, quiet
from vera_export.onnx.manifest import Manifest
from vera_export.onnx.runtime import ORT_ERRORS, session
from vera_export.onnx.signature import (
    ADAPTER_INDEX,
    ADAPTERS_AXIS,
    VERA_A,
    VERA_B,
    lambda_input,
    tensor_input,
)


@pytest.mark.parametrize("key", ADAPTER_EXPORTS)
def test_adapter_graph_layout(exports, key: str) -> None:
    """Projections once, no folded copies of them; every trained tensor an overridable input named after it."""
    export = exports[key]
    model = onnx.load(str(export.directory / "model.onnx"))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    vera_A, vera_B = values.pop(VERA_A), values.pop(VERA_B)
    slices = [f(vera_A[:, :k]) for k in range(1, vera_A.shape[1] + 1) for f in (np.asarray, np.transpose)]
    slices += [f(vera_B[:k]) for k in range(1, vera_B.shape[0] + 1) for f in (np.asarray, np.transpose)]
    for name, value in values.items():
        assert not any(value.shape == s.shape and np.array_equal(value, s) for s in slices), name

    adapter = Manifest.read(export.directory)
    expected = {lambda_input(m, kind) for m in adapter.layers for kind in "bd"}
    expected |= {tensor_input(n) for n in adapter.replaced}
    runner = session(export.directory)
    overridable = {i.name for i in runner.get_overridable_initializers()}
    if export.spec.task == "feature-extraction":
        # The classifier and the pooler are not part of the encoder's output: nothing to swap there.
        dropped = {n for n in expected if ".classifier." in f".{n}" or ".pooler." in n}
        assert dropped and overridable == expected - dropped
    else:
        assert overridable == expected
    assert [i.name for i in runner.get_inputs()] == ["input_ids", "attention_mask"]
    assert set(adapter.overridable) == overridable


@pytest.mark.parametrize("key", BANK_SPECS)
def test_bank_graph_interface(banks, key: str) -> None:
    bank = banks[key]
    path = bank.directory / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in tensors]
    assert [i.name for i in inputs] == ["input_ids", "attention_mask", ADAPTER_INDEX]
    for value, dims in zip(inputs, (["batch", "sequence"], ["batch", "sequence"], ["batch"])):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == dims

    manifest = Manifest.read(bank.directory)
    assert manifest.mode == "bank" and manifest.adapters == [str(a) for a in bank.adapters]
    expected = {lambda_input(m, kind) for m in manifest.layers for kind in "bd"}
    expected |= {tensor_input(name) for name in manifest.replaced}
    runner = session(bank.directory)
    overridable = {i.name: i.shape for i in runner.get_overridable_initializers()}
    assert set(overridable) == expected == set(manifest.overridable)
    for name, shape in overridable.items():
        assert shape[0] == ADAPTERS_AXIS and tensors[name].shape[0] == 3, name
        assert shape == manifest.overridable[name]["shape"]
    # The projections once, as in adapter mode; the guard reads the index before anything else does.
    assert VERA_A in tensors and VERA_B in tensors
    readers = [n for n in model.graph.node if ADAPTER_INDEX in n.input]
    assert INDEX_GUARD in {n.name for n in readers} and all(n.op_type != "Gather" for n in readers)


@pytest.mark.parametrize("index", [[3], [0, -1], [-3, 0], [0, 1, 2, 99]], ids=str)
def test_out_of_range_index_is_an_error(banks, index) -> None:
    """ONNX Runtime's Gather alone would take -1 as the last adapter; the graph refuses it, and 3 or more."""
    bank = banks["llama"]
    runner = session(bank.directory)
    (batch,) = bank_batches(vocab_size(bank), [((len(index), 5), index)])
    with pytest.raises(ORT_ERRORS, match=INDEX_GUARD):
        runner.run(None, batch)
    batch[ADAPTER_INDEX] = np.clip(batch[ADAPTER_INDEX], 0, 2)  # in range, the same batch runs
    assert np.isfinite(runner.run(None, batch)[0]).all()


def test_onnx_runtime_gather_alone_would_read_negative_indices_from_the_end() -> None:
    """Why the graph has its own guard: ORT's Gather refuses n, but reads -1 as the last row, silently."""
    helper = onnx.helper
    table = onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["rows"])],
        "gather",
        [helper.make_tensor_value_info("index", onnx.TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, ["batch", 2])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    runner = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(runner.run(None, {"index": np.array([-1])})[0], [[4.0, 5.0]])
    with pytest.raises(ORT_ERRORS, match="out of data bounds"):
        runner.run(None, {"index": np.array([3])})


def _index(*shapes: tuple[int, ...]) -> SimpleNamespace:
    """Enough of a ShardedTensorIndex for `needs_external_data`: tensor shapes."""
    return SimpleNamespace(tensors={f"t{i}": SimpleNamespace(shape=s) for i, s in enumerate(shapes)})


def test_external_data_as_asked_or_when_the_weights_pass_protobuf_s_limit() -> None:
    small, large = _index((1024, 1024)), _index((2**14, 2**14), (2**13, 2**13))  # 4 MiB, 1.25 GiB in float32
    assert needs_external_data(small, torch.float32, None) is False
    assert needs_external_data(large, torch.float32, None) is False
    assert needs_external_data(large, torch.float64, None) is True  # 2.5 GiB
    assert needs_external_data(small, torch.float32, True) is True
    assert needs_external_data(small, torch.float32, False) is False
    with pytest.raises(OutputError, match="float64 weights are 2.5 GiB, more than one ONNX file can hold"):
        needs_external_data(large, torch.float64, False)


def test_quiet_silences_the_named_loggers_and_warnings_and_restores_them() -> None:
    logger = logging.getLogger("torch.onnx")
    before = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet("torch.onnx"):
                assert logger.level == logging.ERROR
                warnings.warn("exporter internals", UserWarning, stacklevel=1)
            assert logger.level == logging.DEBUG
        assert caught == []  # whatever the caller's filter
    finally:
        logger.setLevel(before)


def test_the_graph_is_saved_where_and_how_the_export_says(exports) -> None:
    """Opset, external data and the checker: the saved files are the ones `save` wrote and checked."""
    for key in ("gpt2-adapter", "llama-merged"):
        export = exports[key]
        model = onnx.load(str(export.directory / MODEL_NAME), load_external_data=False)
        external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert bool(external) == (DATA_NAME in {p.name for p in export.directory.iterdir()})
        assert bool(external) == bool(export.spec.external_data)
        assert all(not node.doc_string for node in model.graph.node)  # source locations cleared


def test_an_optimized_and_written_graph_lets_go_of_the_traced_weights(tmp_path) -> None:
    """onnxscript's rewrite rules keep the last node they matched; the optimizer here clears that, so once the
    graph is written and dropped, the traced module's weights are freed before verification loads the model
    twice more (benchmarks/onnx_memory.py measures what it saves)."""
    import gc
    import weakref

    from vera_export.onnx.graph import optimize, save

    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    weight = weakref.ref(module[0].weight)
    with quiet("torch.onnx"):
        program = torch.onnx.export(module, (torch.randn(2, 64),), dynamo=True, optimize=False, verbose=False)
    graph = program.model
    del module, program
    optimize(graph, set())
    save(graph, tmp_path, external_data=False)
    del graph
    gc.collect()
    assert weight() is None
