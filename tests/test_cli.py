"""The command line's own machinery: flags generated from the options classes (so CLI and API cannot drift),
parsed flags turned into options, reports printed with their exit codes, and `--help` without torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.helpers import run_cli
from vera_export.cli import _Command, build_options, main, option_flags
from vera_export.errors import AdapterError, VeraExportError, VeraExportWarning
from vera_export.options import ONNX_MODES, Rounding, VerifyOnnxOptions, VerifyOptions, flag, option_fields

COMMANDS = ["embed-projections", "inspect", "merge", "onnx", "onnx-adapter", "to-lora", "unmerge", "verify"]
# What a command takes besides its options: where its inputs are and where its output goes.
LOCATIONS = {"adapter", "adapters", "base", "merged", "model", "onnx_dir", "output"}


def _required(name: str) -> list[str]:
    """Placeholders for the required locations of `vera-export NAME`."""
    required = []
    for param in main.commands[name].params:
        if param.required:
            required += ["x"] if isinstance(param, click.Argument) else [param.opts[0], "x"]
    return required


def _parse(name: str, *args: str) -> dict:
    """The parsed parameters of `vera-export NAME ARGS`, nothing run."""
    with main.commands[name].make_context(name, [*_required(name), *args]) as ctx:
        return dict(ctx.params)


def test_the_subcommands_are_the_documented_ones() -> None:
    assert sorted(main.commands) == COMMANDS


@pytest.mark.parametrize("name", COMMANDS)
def test_flags_are_exactly_the_options_fields_and_the_locations(name: str) -> None:
    """Each field with a flag has exactly one option; every other option is a location, --json or --debug."""
    command = main.commands[name]
    fields = [f.name for f in option_fields(command.options_class)]
    assert fields, name
    params = [p.name for p in command.params]
    for f in fields:
        assert params.count(f) == 1, f
    for param in command.params:
        if param.name in fields:
            continue
        if param.name in ("as_json", "debug"):
            assert isinstance(param, click.Option) and param.is_flag
        else:
            assert param.name in LOCATIONS and isinstance(param.type, click.Path), param.name
    assert params.count("as_json") == params.count("debug") == 1


def test_verify_onnx_takes_its_options_from_the_verify_flags() -> None:
    """`verify --onnx` builds VerifyOnnxOptions from `verify`'s flags: each of its fields must be one of them."""
    onnx_fields = {f.name: f for f in option_fields(VerifyOnnxOptions)}
    verify_fields = {f.name: f for f in option_fields(VerifyOptions)}
    assert onnx_fields.keys() <= verify_fields.keys()
    for name, f in onnx_fields.items():
        assert (
            f.default == verify_fields[name].default
            and f.metadata["flag"] == verify_fields[name].metadata["flag"]
        )


@pytest.mark.parametrize("name", COMMANDS)
def test_no_flags_give_the_python_api_s_defaults(name: str) -> None:
    cls = main.commands[name].options_class
    params = _parse(name)
    assert build_options(cls, params) == cls()
    assert params.keys() <= LOCATIONS | {"as_json", "debug"}  # the fields were taken out


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("merge", ["--quiet"], {"progress": False}),
        ("merge", ["--rounding", "separate"], {"rounding": Rounding.SEPARATE}),
        ("merge", ["--verify", "--device", "cuda:1"], {"verify": True, "device": "cuda:1"}),
        (
            "merge",
            ["--force", "--fsync", "--allow-pickle"],
            {"force": True, "fsync": True, "allow_pickle": True},
        ),
        ("unmerge", ["--quiet", "--rounding", "fma"], {"progress": False, "rounding": Rounding.FMA}),
        ("verify", ["--layers-only"], {"full_model": False}),
        ("verify", ["--full-model", "--quiet"], {"full_model": True, "progress": False}),
        ("onnx", ["--no-verify", "--mode", "bank"], {"verify": False, "mode": "bank"}),
        ("onnx", ["--external-data"], {"external_data": True}),
        ("onnx", ["--no-external-data", "--opset", "23"], {"external_data": False, "opset": 23}),
        ("onnx", ["--task", "feature-extraction"], {"task": "feature-extraction"}),
        ("onnx-adapter", ["--force"], {"force": True}),
        ("to-lora", ["--rank", "4", "--dtype", "bfloat16"], {"rank": 4, "dtype": "bfloat16"}),
        ("embed-projections", ["--rounding", "separate"], {"rounding": Rounding.SEPARATE}),
        ("inspect", ["--allow-pickle"], {"allow_pickle": True}),
    ],
)
def test_flags_become_the_options(name: str, args: list[str], expected: dict) -> None:
    cls = main.commands[name].options_class
    options = build_options(cls, _parse(name, *args))
    assert options == dataclasses.replace(cls(), **expected)
    assert all(type(getattr(options, k)) is type(v) for k, v in expected.items())


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("onnx", ["--opset", "17"]),
        ("onnx", ["--opset", "24"]),
        ("onnx", ["--mode", "lora"]),
        ("to-lora", ["--rank", "0"]),
        ("to-lora", ["--dtype", "float64"]),
        ("merge", ["--rounding", "avx"]),
    ],
)
def test_values_the_options_refuse_are_usage_errors(name: str, args: list[str]) -> None:
    result = CliRunner().invoke(main, [name, *_required(name), *args])
    assert result.exit_code == 2 and "Invalid value" in result.output and result.exception is not None
    assert not isinstance(result.exception, (ValueError, VeraExportError))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "pass exactly one of --merged and --onnx"),
        (["--merged", "m", "--onnx", "o"], "pass exactly one of --merged and --onnx"),
        (["--onnx", "o", "--rounding", "separate"], "--rounding do not apply to --onnx"),
        (["--onnx", "o", "--layers-only"], "--full-model do not apply to --onnx"),
    ],
)
def test_verify_refuses_flags_that_do_not_apply(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(main, ["verify", "--base", "b", "--adapter", "a", *args])
    assert result.exit_code == 2 and fragment in result.output


@pytest.mark.parametrize("args", [["--debug", "inspect", "missing"], ["inspect", "missing", "--debug"]])
def test_debug_before_or_after_the_command_shows_the_traceback(tmp_path: Path, args: list[str]) -> None:
    args = [str(tmp_path / a) if a == "missing" else a for a in args]
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, AdapterError) and result.exc_info is not None
    without = CliRunner().invoke(main, [a for a in args if a != "--debug"])
    assert without.exit_code == 2 and isinstance(without.exception, SystemExit)


def test_help_imports_neither_torch_nor_onnx() -> None:
    """`vera-export --help` (and each command's) answers at once: nothing heavy is imported before a command runs."""
    code = (
        "import sys\n"
        "from vera_export.cli import main\n"
        "for args in (['--help'], *([name, '--help'] for name in main.commands)):\n"
        "    assert main(args, standalone_mode=False) == 0\n"
        "heavy = ('torch', 'onnx', 'onnxruntime', 'transformers', 'safetensors', 'numpy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage: " in result.stdout and result.stdout.splitlines()[-1] == "[]"


# --- how a command's report is printed -------------------------------------------------------------------------


@dataclass
class FakeReport:
    ok: bool = True
    warnings: list[str] = field(default_factory=list)
    command = "fake"

    def text(self, quiet: bool = False) -> str:
        return "only what needs attention" if quiet else "everything"


@dataclass(frozen=True)
class FakeOptions:
    progress: bool = flag(True, "No progress bar.", "--quiet", negate=True)


def _command(callback, options_class: type | None = None) -> click.Command:
    """A command built as `vera-export`'s are, outside `main`."""
    params = [option_flags(f) for f in option_fields(options_class)] if options_class else []
    params += [click.Option(["--json", "as_json"], is_flag=True), click.Option(["--debug"], is_flag=True)]
    return _Command("fake", callback=callback, params=params, options_class=options_class)


def _invoke(callback, *args: str, options_class: type | None = FakeOptions):
    return CliRunner().invoke(_command(callback, options_class), list(args))


@pytest.mark.parametrize(("ok", "code"), [(True, 0), (False, 1)])
def test_a_report_prints_its_text_and_exits_with_its_verdict(ok: bool, code: int) -> None:
    result = _invoke(lambda options: FakeReport(ok=ok))
    assert (result.exit_code, result.stdout, result.stderr) == (code, "everything\n", "")
    quiet = _invoke(lambda options: FakeReport(ok=ok), "--quiet")
    assert (quiet.exit_code, quiet.stdout) == (code, "only what needs attention\n")


def test_the_callback_receives_its_options() -> None:
    seen = []
    _invoke(lambda options: seen.append(options) or FakeReport(), "--quiet")
    assert seen == [FakeOptions(progress=False)]


def test_our_warnings_are_one_line_each_and_others_are_silent() -> None:
    def callback(options):
        warnings.warn("a stale staging directory", VeraExportWarning, stacklevel=1)
        warnings.warn("a library's chatter", UserWarning, stacklevel=1)
        return FakeReport(warnings=["a report warning"])

    result = _invoke(callback)
    assert result.exit_code == 0
    assert result.stderr.splitlines() == ["warning: a stale staging directory", "warning: a report warning"]
    envelope = json.loads(_invoke(callback, "--json").stdout)
    assert envelope["warnings"] == ["a stale staging directory", "a report warning"]


def test_an_expected_error_is_one_line_and_exit_2() -> None:
    def callback(options):
        raise AdapterError("ad\napter.json: field 'r' is 0")

    result = _invoke(callback)
    assert (result.exit_code, result.stdout, result.stderr) == (
        2,
        "",
        "error: ad\\napter.json: field 'r' is 0\n",
    )
    envelope = json.loads(_invoke(callback, "--json").stdout)
    assert envelope["exit_code"] == 2 and envelope["result"] is None
    assert envelope["error"] == {"type": "AdapterError", "message": "ad\\napter.json: field 'r' is 0"}
    assert isinstance(_invoke(callback, "--debug").exception, AdapterError)


def test_ctrl_c_is_exit_130_and_says_nothing_partial_was_left() -> None:
    def callback(options):
        raise KeyboardInterrupt

    result = _invoke(callback)
    assert result.exit_code == 130
    assert result.stderr.startswith("error: stopped by SIGINT") and "nothing partial" in result.stderr
    assert json.loads(_invoke(callback, "--json").stdout)["exit_code"] == 130


def test_a_bug_keeps_its_traceback() -> None:
    def callback(options):
        raise RuntimeError("a bug")

    result = _invoke(callback)
    assert isinstance(result.exception, RuntimeError) and "error:" not in result.stderr


def test_a_command_without_options_gets_none() -> None:
    result = _invoke(lambda: FakeReport(), options_class=None)
    assert (result.exit_code, result.stdout) == (0, "everything\n")


def test_the_real_entry_point_runs_a_command(tmp_path: Path) -> None:
    """`run_cli` goes through `main` as the console script does: an error there is one line too."""
    result = run_cli("onnx-adapter", "--model", tmp_path, "--adapter", tmp_path, "--output", tmp_path / "x")
    assert (
        result.exit_code == 2 and result.stderr.startswith("error: ") and "vera_export.json" in result.stderr
    )


def test_every_flag_has_help_and_choices_are_shown() -> None:
    for name in COMMANDS:
        for param in main.commands[name].params:
            if isinstance(param, click.Option):
                assert param.help, (name, param.name)
    mode = next(p for p in main.commands["onnx"].params if p.name == "mode")
    assert tuple(mode.type.choices) == ONNX_MODES


def test_ctrl_c_while_the_cli_imports_is_one_line_and_exit_130(monkeypatch, capsys) -> None:
    """The first second of a run is spent importing; an interrupt there is no traceback either."""
    import importlib.abc

    from vera_export.__main__ import run

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "vera_export.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "vera_export.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as caught:
        run()
    assert caught.value.code == 130
    assert (
        capsys.readouterr().err
        == "error: stopped by SIGINT before the command started; nothing was written\n"
    )
