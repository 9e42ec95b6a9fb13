"""The options classes: frozen, validated where a value can be out of range, and their flags declared once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from vera_export import options
from vera_export.options import (
    MAX_OPSET,
    MIN_OPSET,
    ONNX_MODES,
    ONNX_TASKS,
    EmbedOptions,
    InspectOptions,
    MergeOptions,
    OnnxAdapterOptions,
    OnnxOptions,
    Rounding,
    ToLoraOptions,
    UnmergeOptions,
    VerifyOnnxOptions,
    VerifyOptions,
    flag,
    option_fields,
)

CLASSES = [
    MergeOptions,
    UnmergeOptions,
    VerifyOptions,
    VerifyOnnxOptions,
    InspectOptions,
    OnnxOptions,
    OnnxAdapterOptions,
    ToLoraOptions,
    EmbedOptions,
]
# Fields without a command-line flag: tuning knobs of the Python API.
PYTHON_ONLY = {MergeOptions: {"block_rows", "overlap"}, UnmergeOptions: {"block_rows", "overlap"}}


def test_every_options_class_of_the_module_is_listed() -> None:
    defined = {
        c for c in vars(options).values() if dataclasses.is_dataclass(c) and c.__module__ == options.__name__
    }
    assert defined == set(CLASSES)


@pytest.mark.parametrize("cls", CLASSES)
def test_options_are_frozen(cls: type) -> None:
    instance = cls()
    for f in dataclasses.fields(cls):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(instance, f.name, getattr(instance, f.name))
    assert hash(instance) == hash(cls())  # frozen and compared by value: usable as a default argument


@pytest.mark.parametrize("cls", CLASSES)
def test_option_fields_are_exactly_the_fields_with_a_flag(cls: type) -> None:
    names = [f.name for f in option_fields(cls)]
    assert names == [f.name for f in dataclasses.fields(cls) if f.name not in PYTHON_ONLY.get(cls, set())]
    assert all(f.metadata["help"] for f in option_fields(cls))


def test_option_fields_leave_out_python_only_and_plain_fields() -> None:
    @dataclasses.dataclass(frozen=True)
    class Demo:
        shown: int = flag(1, "Shown.")
        named: bool = flag(True, "Named.", "--no-thing", negate=True)
        hidden: int = flag(2, "Hidden.", None)
        plain: int = 3

    assert [f.name for f in option_fields(Demo)] == ["shown", "named"]
    named = option_fields(Demo)[1].metadata
    assert (named["flag"], named["negate"], named["help"]) == ("--no-thing", True, "Named.")
    assert Demo() == Demo(1, True, 2, 3)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"mode": "lora"}, "mode is 'lora', expected one of ('merged', 'adapter', 'bank')"),
        ({"task": "translation"}, "task is 'translation', expected 'auto' or one of"),
        ({"opset": MIN_OPSET - 1}, f"opset is {MIN_OPSET - 1}, expected {MIN_OPSET} to {MAX_OPSET}"),
        ({"opset": MAX_OPSET + 1}, f"opset is {MAX_OPSET + 1}"),
        ({"precision": "int8"}, "precision is 'int8', expected one of ('fp32', 'fp16', 'int4')"),
        ({"precision": "int4"}, "precision int4 needs --task text-generation"),
        ({"precision": "int4", "task": "causal-lm"}, "precision int4 needs --task text-generation"),
    ],
)
def test_onnx_options_refuse_values_out_of_range(changes: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        OnnxOptions(**changes)


def test_onnx_options_accept_every_value_in_range() -> None:
    for mode in ONNX_MODES:
        assert OnnxOptions(mode=mode).mode == mode
    for task in ("auto", *ONNX_TASKS):
        assert OnnxOptions(task=task).task == task
    for opset in range(MIN_OPSET, MAX_OPSET + 1):
        assert OnnxOptions(opset=opset).opset == opset
    for precision in ("fp32", "fp16"):
        assert OnnxOptions(precision=precision).precision == precision
    assert OnnxOptions(task="text-generation", precision="int4").precision == "int4"


@pytest.mark.parametrize("rank", [0, -1])
def test_to_lora_options_refuse_a_rank_below_one(rank: int) -> None:
    with pytest.raises(ValueError, match=f"rank must be a positive integer, got {rank}"):
        ToLoraOptions(rank=rank)


def test_to_lora_options_accept_a_positive_rank_or_none() -> None:
    assert ToLoraOptions(rank=1).rank == 1 and ToLoraOptions().rank is None


def test_rounding_is_a_string_enum_of_the_two_kernels() -> None:
    assert [r.value for r in Rounding] == ["fma", "separate"]
    assert Rounding("separate") is Rounding.SEPARATE and Rounding.FMA == "fma"
    assert MergeOptions().rounding is Rounding.FMA
    (rounding,) = [f for f in option_fields(MergeOptions) if f.name == "rounding"]
    assert rounding.metadata["choices"] == ("fma", "separate")


def test_importing_the_options_loads_neither_torch_nor_onnx() -> None:
    code = (
        "import sys, vera_export.options; "
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
