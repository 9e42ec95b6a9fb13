"""`vera-export`: each subcommand parses its arguments and calls one library function; the report prints itself.

Options come from the frozen dataclasses in `options` (one per command), so flags and Python API cannot drift.
Every command takes `--json` (the envelope of `reports.envelope` on stdout, errors included) and `--debug`
(tracebacks instead of one-line errors). Nothing here imports torch or ONNX before a command runs.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import options as opts
from .errors import VeraExportError, VeraExportWarning
from .io.outputs import PLACED
from .io.outputs import reset as reset_placed
from .reports import EXIT_ERROR, EXIT_FAILED, EXIT_OK, Report, envelope, message


class _Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like KeyboardInterrupt, so staged outputs are removed on the way out."""


class Interrupted(Exception):
    """What the JSON envelope reports when a signal stopped the run."""


def _terminate(signum: int, frame) -> None:
    raise _Terminated(signum)


def _emit(command: str, as_json: bool, **fields: Any) -> None:
    if as_json:
        click.echo(json.dumps(envelope(command, **fields), indent=2, allow_nan=False))


class _Command(click.Command):
    """Runs the callback, which returns a report, then prints it (text, or the JSON envelope) and exits with its
    code: 0 ok, 1 a check failed, 2 bad input (one `error:` line on stderr), 128 + N stopped by signal N.

    Args:
        options_class: The command's options dataclass: its fields become flags, and the callback receives the
            instance as `options`.
    """

    def __init__(self, *args: Any, options_class: type | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.options_class = options_class

    def invoke(self, ctx: click.Context) -> None:
        as_json = ctx.params.pop("as_json")
        debug = ctx.params.pop("debug") or ctx.find_root().params.get("debug", False)
        if self.options_class is not None:
            ctx.params["options"] = build_options(self.options_class, ctx.params)
        quiet = not getattr(ctx.params.get("options"), "progress", True)
        raised: list[str] = []

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            # Our own warnings become one line each; other libraries' chatter stays out of the way.
            if issubclass(category, VeraExportWarning):
                raised.append(str(message))
                click.echo(f"warning: {message}", err=True)

        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _terminate)
        reset_placed()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            try:
                report: Report = super().invoke(ctx)
                for line in report.warnings:
                    click.echo(f"warning: {line}", err=True)
                if as_json:
                    _emit(self.name, True, report=report, warnings=raised)
                else:
                    click.echo(report.text(quiet))
            except VeraExportError as exc:
                if debug:
                    raise
                click.echo(f"error: {message(exc)}", err=True)
                _emit(self.name, as_json, error=exc, warnings=raised)
                ctx.exit(EXIT_ERROR)
            except (_Terminated, KeyboardInterrupt) as exc:
                signum = exc.args[0] if isinstance(exc, _Terminated) else signal.SIGINT
                ctx.exit(_interrupted(self.name, signal.Signals(signum), as_json, raised))
        ctx.exit(EXIT_OK if report.ok else EXIT_FAILED)


def _interrupted(command: str, signum: signal.Signals, as_json: bool, raised: list[str]) -> int:
    """Say what a signal left, and return the exit code that tells the truth about it: 0 when the output was
    already complete and nothing else was running, else 128 + N."""
    if not PLACED.outputs:
        stopped = Interrupted(f"stopped by {signum.name}; nothing partial was left under the output name")
    elif PLACED.pending is not None:
        stopped = Interrupted(
            f"stopped by {signum.name}: {PLACED.outputs[-1]} is complete, but {PLACED.pending} was stopped"
        )
    else:
        note = f"{signum.name} arrived after {PLACED.outputs[-1]} was complete; it is kept, and the run succeeded"
        click.echo(f"warning: {note}", err=True)
        _emit(command, as_json, exit_code=EXIT_OK, warnings=[*raised, note])
        return EXIT_OK
    click.echo(f"error: {stopped}", err=True)
    _emit(command, as_json, error=stopped, exit_code=128 + signum, warnings=raised)
    return 128 + signum


def build_options(cls: type, params: dict[str, Any]) -> Any:
    """An instance of the options dataclass `cls` from the parsed flags (removed from `params`)."""
    values = {}
    for f in opts.option_fields(cls):
        value = params.pop(f.name)
        if f.metadata["negate"]:
            value = not value
        elif isinstance(f.default, enum.Enum):
            value = type(f.default)(value)
        values[f.name] = value
    try:
        return cls(**values)
    except ValueError as exc:  # a rule across flags (each flag's own values are click's to check)
        raise click.UsageError(str(exc)) from None


def option_flags(f: dataclasses.Field) -> click.Option:
    """The click option of one options field (see `options.flag`)."""
    meta = f.metadata
    name = meta["flag"] or "--" + f.name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": meta["help"]}
    if meta["negate"]:  # the flag turns the field off: --quiet is progress=False
        return click.Option([name, f.name], is_flag=True, default=False, **kwargs)
    if f.type in ("bool", "bool | None"):
        # A switch that is off by default is a plain flag; one that is on (or undecided) can be turned off.
        if f.default is not False and "/" not in name:
            name = f"{name}/--no-{name.removeprefix('--')}"
        return click.Option([name, f.name], is_flag=True, default=f.default, **kwargs)
    default = f.default.value if isinstance(f.default, enum.Enum) else f.default
    if meta["choices"]:
        kwargs["type"] = click.Choice(meta["choices"])
    elif meta["minimum"] is not None:
        kwargs["type"] = click.IntRange(meta["minimum"], meta["maximum"])
    return click.Option([name, f.name], default=default, show_default=default is not None, **kwargs)


def command(name: str, options_class: type | None = None) -> Callable:
    """A `vera-export` subcommand: its callback returns a report; `options_class`'s fields become its flags."""

    def decorate(callback: Callable) -> click.Command:
        params = list(getattr(callback, "__click_params__", []))[::-1]
        if options_class is not None:
            params += [option_flags(f) for f in opts.option_fields(options_class)]
        params += [
            click.Option(["--json", "as_json"], is_flag=True, help="Print the JSON envelope on stdout."),
            click.Option(["--debug"], is_flag=True, help="Show tracebacks for errors."),
        ]
        cmd = _Command(
            name, callback=callback, params=params, help=callback.__doc__, options_class=options_class
        )
        main.add_command(cmd)
        return cmd

    return decorate


class _Group(click.Group):
    """With `--json` anywhere on the line, a usage error is also an envelope on stdout."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            exc.show()
            if "--json" in argv:
                name = next((a for a in argv if a in self.commands), "vera-export")
                _emit(name, True, error=click.UsageError(exc.format_message()), exit_code=exc.exit_code)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(EXIT_FAILED)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (also accepted after the command).")
@click.version_option(package_name="vera-export")
def main(debug: bool) -> None:
    """Merge, verify and export PEFT VeRA adapters without PEFT.

    \b
    Example:
      vera-export merge --base fixtures/tiny-llama --adapter fixtures/tiny-llama-vera --output out/merged --verify
    """


_path = click.Path(path_type=Path)


def _adapters(help: str = "PEFT VeRA adapter directory; repeat for several (folded in order).") -> Callable:
    return click.option("--adapter", "adapters", multiple=True, required=True, type=_path, help=help)


def _location(flag: str, help: str, required: bool = True) -> Callable:
    return click.option(
        flag, flag.removeprefix("--").replace("-", "_"), required=required, type=_path, help=help
    )


@command("merge", opts.MergeOptions)
@_location("--base", "Base model directory (config.json + safetensors).")
@_adapters()
@_location("--output", "Directory for the merged checkpoint.")
def merge_command(base: Path, adapters: tuple[Path, ...], output: Path, options: opts.MergeOptions):
    """Fold VeRA adapters into a base checkpoint, correctly rounded, streaming shard by shard.

    \b
    Example:
      vera-export merge --base ./llama --adapter ./my-vera --output ./llama-merged --verify
    """
    from .merging import merge

    return merge(base, adapters, output, options)


@command("unmerge", opts.UnmergeOptions)
@_location("--merged", "Merged model directory.")
@_adapters()
@_location("--output", "Directory for the restored base checkpoint.")
def unmerge_command(merged: Path, adapters: tuple[Path, ...], output: Path, options: opts.UnmergeOptions):
    """Subtract VeRA adapters from a merged checkpoint.

    Trained biases and modules_to_save that the merge replaced cannot be restored and are reported.

    \b
    Example:
      vera-export unmerge --merged ./llama-merged --adapter ./my-vera --output ./llama-restored
    """
    from .merging import unmerge

    return unmerge(merged, adapters, output, options)


@command("inspect", opts.InspectOptions)
@click.argument("adapter", type=_path)
@_location("--base", "Also check the adapter against this base model directory.", required=False)
def inspect_command(adapter: Path, base: Path | None, options: opts.InspectOptions):
    """Describe an adapter and, with --base, every incompatibility with that base.

    Exits 1 when --base is given and the adapter does not fit it.

    \b
    Example:
      vera-export inspect ./my-vera --base ./llama --json
    """
    from .inspection import inspect

    return inspect(adapter, base, options)


@command("verify", opts.VerifyOptions)
@_location("--base", "Base model directory.")
@_adapters("PEFT VeRA adapter directory; repeat for several, in the order they were merged or exported.")
@_location("--merged", "Merged model directory to check.", required=False)
@click.option(
    "--onnx", "onnx_dir", type=_path, help="Directory written by `vera-export onnx` to check instead."
)
def verify_command(
    base: Path,
    adapters: tuple[Path, ...],
    merged: Path | None,
    onnx_dir: Path | None,
    options: opts.VerifyOptions,
):
    """Check a merged checkpoint or an ONNX export against the unmerged VeRA model; exit 1 if any check fails.

    With --onnx, the graph runs in ONNX Runtime on two input shapes; the projections are regenerated with the
    rounding recorded at export, so --rounding does not apply, nor does --full-model.

    \b
    Examples:
      vera-export verify --base ./llama --adapter ./my-vera --merged ./llama-merged --json
      vera-export verify --base ./llama --adapter ./my-vera --onnx ./llama-onnx
    """
    if (merged is None) == (onnx_dir is None):
        raise click.UsageError("pass exactly one of --merged and --onnx")
    if onnx_dir is None:
        from .verification import verify

        return verify(base, adapters, merged, options)
    ctx = click.get_current_context()
    given = [f"--{p.replace('_', '-')}" for p in ("full_model", "rounding") if _given(ctx, p)]
    if given:
        raise click.UsageError(f"{' and '.join(given)} do not apply to --onnx")
    from .onnx.verify import verify_onnx

    onnx_options = opts.VerifyOnnxOptions(allow_pickle=options.allow_pickle, progress=options.progress)
    return verify_onnx(onnx_dir, base, adapters, onnx_options)


def _given(ctx: click.Context, param: str) -> bool:
    source = ctx.get_parameter_source(param)
    return source is not None and source is not click.core.ParameterSource.DEFAULT


@command("onnx", opts.OnnxOptions)
@_location("--base", "Base model directory (config.json + safetensors).")
@_adapters("PEFT VeRA adapter directory; repeat for several (folded in order, or a bank's rows in order).")
@_location("--output", "Directory for model.onnx, vera_export.json and the config.")
def onnx_command(base: Path, adapters: tuple[Path, ...], output: Path, options: opts.OnnxOptions):
    """Export the base model with VeRA adapters to ONNX; exit 1 if the graph fails verification.

    \b
    Examples:
      vera-export onnx --base ./llama --adapter ./my-vera --output ./llama-onnx --mode adapter
      vera-export onnx --base ./llama --adapter ./alice-vera --adapter ./bob-vera --output ./llama-bank --mode bank
    """
    from .onnx.export import export_onnx

    return export_onnx(base, adapters, output, options)


@command("onnx-adapter", opts.OnnxAdapterOptions)
@_location("--model", "Directory written by `vera-export onnx --mode adapter` or `--mode bank`.")
@_adapters(
    "PEFT VeRA adapter of the same base and projections; for a bank graph, repeat it: row k of the new bank is "
    "the k-th --adapter."
)
@_location("--output", "The .onnx_adapter file to write.")
def onnx_adapter_command(
    model: Path, adapters: tuple[Path, ...], output: Path, options: opts.OnnxAdapterOptions
):
    """Write VeRA adapters as an ONNX Runtime adapter file for a graph exported in adapter or bank mode.

    Load it with onnxruntime.LoraAdapter and apply it per run with RunOptions.add_active_adapter. An adapter-mode
    graph takes one --adapter; a bank graph takes any number of them, and the file replaces the whole bank.

    \b
    Examples:
      vera-export onnx-adapter --model ./llama-onnx --adapter ./other-vera --output ./other.onnx_adapter
      vera-export onnx-adapter --model ./llama-bank --adapter ./dave-vera --adapter ./erin-vera --output ./team.onnx_adapter
    """
    from .onnx.adapter_file import onnx_adapter

    return onnx_adapter(model, list(adapters), output, options)


@command("to-lora", opts.ToLoraOptions)
@_location("--base", "Base model directory (config.json + safetensors).")
@_location("--adapter", "PEFT VeRA adapter directory.")
@_location("--output", "Directory for the PEFT LoRA adapter.")
def to_lora_command(base: Path, adapter: Path, output: Path, options: opts.ToLoraOptions):
    """Export a VeRA adapter as a plain PEFT LoRA adapter, exactly or truncated to rank K.

    Warns where vLLM would refuse the result (rank above 16, modules_to_save, trained biases).

    \b
    Example:
      vera-export to-lora --base ./llama --adapter ./my-vera --output ./my-lora --rank 16
    """
    from .lora import to_lora

    return to_lora(base, adapter, output, options)


@command("embed-projections", opts.EmbedOptions)
@_location("--base", "Base model directory the adapter is used with.")
@_location("--adapter", "PEFT VeRA adapter saved with save_projection=False.")
@_location("--output", "Directory for the adapter with projections embedded.")
def embed_projections_command(base: Path, adapter: Path, output: Path, options: opts.EmbedOptions):
    """Store the projections PEFT regenerates for this base in a copy of the adapter (save_projection true).

    \b
    Example:
      vera-export embed-projections --base ./llama --adapter ./my-vera --output ./my-vera-embedded
    """
    from .embed import embed_projections

    return embed_projections(base, adapter, output, options)
