"""`adapter_config.json`: read as PEFT reads it (its defaults for missing fields), every bad field refused by name."""

from __future__ import annotations

import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import adapter_dir, base_dir
from vera_export import VeraExportError, VeraExportWarning, load_adapter
from vera_export.config import VeraConfig, read_config
from vera_export.errors import AdapterError
from vera_export.io.index import ShardedTensorIndex
from vera_export.plan import build_plan

ADAPTER = "llama-qv"


def _config_file(tmp_path: Path, raw: object) -> Path:
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(raw))
    return path


def test_a_fixture_config_reads_as_written(fixture_root: Path) -> None:
    path = adapter_dir(fixture_root, "bert-cls") / "adapter_config.json"
    raw = json.loads(path.read_text())
    config = VeraConfig.from_json(path)
    assert read_config(path) == raw
    assert (config.r, config.projection_prng_key, config.save_projection) == (8, 3, False)
    assert config.target_modules == tuple(sorted(raw["target_modules"]))
    assert (config.bias, config.task_type) == ("vera_only", "SEQ_CLS")
    # PEFT saves a classifier's head twice (its task type adds it again), and "score": each once here.
    assert (
        config.modules_to_save == ("classifier", "score") and raw["modules_to_save"].count("classifier") == 2
    )


def test_missing_fields_take_peft_s_defaults(tmp_path: Path) -> None:
    from peft import VeraConfig as PeftVeraConfig

    peft = PeftVeraConfig(target_modules=["q_proj"])
    ours = VeraConfig.from_json(_config_file(tmp_path, {"peft_type": "VERA", "target_modules": ["q_proj"]}))
    for name in ("r", "projection_prng_key", "save_projection", "fan_in_fan_out", "bias", "task_type"):
        assert getattr(ours, name) == getattr(peft, name), name
    assert ours.modules_to_save == () and peft.modules_to_save is None
    assert ours.layers_to_transform is peft.layers_to_transform is None
    assert ours.layers_pattern is peft.layers_pattern is None


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("target_modules", ["v_proj", "q_proj", "v_proj"], ("q_proj", "v_proj")),  # a set in PEFT
        ("target_modules", r".*\.q_proj", r".*\.q_proj"),  # a regex stays a string
        ("modules_to_save", ["score", "score", "lm_head"], ("score", "lm_head")),
        ("modules_to_save", "lm_head", ("lm_head",)),
        ("layers_to_transform", 1, 1),
        ("layers_to_transform", [0, 1], (0, 1)),
        ("layers_pattern", "layers", ("layers",)),
        ("layers_pattern", "", None),  # PEFT: "" and [] mean no pattern
        ("layers_pattern", [], None),
        ("projection_prng_key", 2**70, 2**70),
    ],
)
def test_fields_are_normalized_as_peft_reads_them(tmp_path: Path, field: str, value, expected) -> None:
    raw = {"peft_type": "VERA", "target_modules": ["q_proj"], field: value}
    assert getattr(VeraConfig.from_json(_config_file(tmp_path, raw)), field) == expected


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"peft_type": "LORA"}, "peft_type is 'LORA', expected 'VERA'"),
        ({"peft_type": None}, "peft_type is None"),
        ({"r": 0}, "field 'r' is 0, expected a positive integer"),
        ({"r": True}, "field 'r' is True, expected an integer"),
        ({"r": 8.0}, "field 'r' is 8.0, expected an integer"),
        ({"projection_prng_key": "0"}, "field 'projection_prng_key'"),
        ({"save_projection": 1}, "field 'save_projection' is 1, expected true or false"),
        ({"fan_in_fan_out": "false"}, "field 'fan_in_fan_out'"),
        ({"bias": "lora_only"}, "field 'bias' is 'lora_only', expected 'none' or 'all' or 'vera_only'"),
        ({"target_modules": []}, "'target_modules' is missing"),
        ({"target_modules": None}, "'target_modules' is missing"),
        ({"target_modules": ["q_proj", 3]}, "expected a regex string or a list of module names"),
        ({"target_modules": ["q_proj", ""]}, "expected a regex string or a list of module names"),
        ({"target_modules": "(q_proj"}, "field 'target_modules' is not a valid regular expression"),
        ({"modules_to_save": ["("]}, "field 'modules_to_save' is not a valid regular expression"),
        ({"modules_to_save": {"a": 1}}, "field 'modules_to_save' is {'a': 1}, expected a list of strings"),
        ({"layers_pattern": "["}, "field 'layers_pattern' is not a valid regular expression"),
        ({"layers_to_transform": [1, True]}, "expected an integer, a list of integers or null"),
        ({"task_type": 3}, "field 'task_type' is 3, expected a string or null"),
        ({"base_model_name_or_path": ["x"]}, "field 'base_model_name_or_path'"),
    ],
)
def test_a_bad_field_is_refused_by_name(tmp_path: Path, changes: dict, fragment: str) -> None:
    path = _config_file(tmp_path, {"peft_type": "VERA", "r": 8, "target_modules": ["q_proj"], **changes})
    with pytest.raises(AdapterError) as caught:
        VeraConfig.from_json(path)
    assert str(caught.value).startswith(f"{path}: ") and fragment in str(caught.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "no adapter_config.json; point --adapter at a PEFT adapter directory"),
        (b"{r: 8,", "not a readable JSON file"),
        (b"\xff\xfe{}", "not a readable JSON file"),
        (b"[" * 100_000 + b"]" * 100_000, "not a readable JSON file"),
        (b'["VERA"]', "expected a JSON object, found list"),
    ],
    ids=["missing", "not JSON", "not UTF-8", "nested too deep", "a list"],
)
def test_an_unreadable_config_is_one_adapter_error(
    tmp_path: Path, content: bytes | None, fragment: str
) -> None:
    path = tmp_path / "adapter_config.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AdapterError, match=fragment):
        read_config(path)


_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.text(max_size=8), st.integers(-3, 40), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_PLAUSIBLE = {
    "r": st.one_of(st.sampled_from([8, 16, 0, -1]), st.integers(-5, 10**12)),
    "target_modules": st.one_of(
        st.lists(
            st.sampled_from(["q_proj", "v_proj", "k_proj", "mlp", "model.layers.0.self_attn.q_proj", ""]),
            max_size=4,
        ),
        st.sampled_from([".*q_proj", "(", ".*", "all-linear", r".*\.(q|v)_proj", "[z-a]"]),
    ),
    "projection_prng_key": st.integers(-(2**80), 2**80),
    "save_projection": st.booleans(),
    "fan_in_fan_out": st.booleans(),
    "bias": st.sampled_from(["none", "all", "vera_only", "lora_only", ""]),
    "modules_to_save": st.one_of(
        st.none(), st.lists(st.sampled_from(["lm_head", "q_proj", "(", "score"]), max_size=3)
    ),
    "layers_to_transform": st.one_of(st.none(), st.integers(-2, 3), st.lists(st.integers(-2, 3), max_size=3)),
    "layers_pattern": st.one_of(st.none(), st.sampled_from(["layers", "h", "(", ["layers", "blocks"]])),
}


def test_fuzzed_adapter_configs_end_in_our_errors_and_reach_every_outcome(
    fixture_root: Path, tmp_path: Path
) -> None:
    """Any adapter_config.json either loads and plans against the base, or fails with our own error; and the
    fuzzer explored both valid configs and each kind of rejection.

    Each example starts from the adapter's real config and changes, drops or garbles a few fields.
    """
    source = adapter_dir(fixture_root, ADAPTER)
    fuzz_adapter = tmp_path / "fuzz"
    fuzz_adapter.mkdir()
    shutil.copy(source / "adapter_model.safetensors", fuzz_adapter)
    real_config = json.loads((source / "adapter_config.json").read_text())
    shapes = ShardedTensorIndex.from_dir(base_dir(fixture_root, ADAPTER)).tensors
    outcomes: Counter[str] = Counter()

    @settings(max_examples=1500, deadline=None)
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        config = dict(real_config)
        for key in data.draw(
            st.lists(st.sampled_from([*sorted(_PLAUSIBLE), "peft_type"]), max_size=4, unique=True)
        ):
            choice = data.draw(st.sampled_from(["plausible", "garbage", "drop"]))
            if choice == "drop":
                config.pop(key, None)
            else:
                config[key] = data.draw(
                    _PLAUSIBLE.get(key, st.just("LORA")) if choice == "plausible" else _ANY
                )
        (fuzz_adapter / "adapter_config.json").write_text(json.dumps(config))
        try:
            build_plan([load_adapter(fuzz_adapter)], shapes)
            outcomes["planned"] += 1
        except VeraExportError as exc:
            outcomes[type(exc).__name__] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VeraExportWarning)
        fuzz()
    assert {"planned", "AdapterError", "IncompatibleAdapterError"} <= outcomes.keys(), outcomes
