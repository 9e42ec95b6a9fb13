"""`vera-export`: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import json
import signal
import sys
import warnings
from pathlib import Path

import click

from .embed import embed_projections
from .errors import VeraExportError, VeraExportWarning
from .inspection import inspect
from .lora import DTYPES, to_lora
from .merging import merge, unmerge
from .options import MAX_OPSET, MIN_OPSET, MODES, TASKS, MergeOptions, OnnxOptions
from .projections import Rounding
from .verification import verify

EXIT_FAILED = 1  # verification ran and failed
EXIT_ERROR = 2  # bad input: one line on stderr, no traceback


class _Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like KeyboardInterrupt, so staged outputs are removed on the way out."""


def _terminate(signum: int, frame) -> None:
    raise _Terminated(signum)


class _Group(click.Group):
    """Turns expected errors into one line on stderr and exit code 2; `--debug` keeps the traceback.

    A signal that stops the run (SIGINT, SIGTERM, SIGHUP) exits 128 + its number, after staged outputs are removed.
    """

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug", False)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _terminate)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except VeraExportError as exc:
                if debug:
                    raise
                click.echo(f"error: {exc}", err=True)
                ctx.exit(EXIT_ERROR)
            except (_Terminated, KeyboardInterrupt) as exc:
                signum = exc.args[0] if isinstance(exc, _Terminated) else signal.SIGINT
                name = signal.Signals(signum).name
                click.echo(
                    f"error: stopped by {name}; nothing partial was left under the output name", err=True
                )
                ctx.exit(128 + signum)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Our own warnings become one line each; other libraries' chatter stays out of the way.
    if issubclass(category, VeraExportWarning):
        click.echo(f"warning: {message}", err=True)


def _warn(lines: list[str]) -> None:
    for line in lines:
        click.echo(f"warning: {line}", err=True)


_path = click.Path(path_type=Path)
_adapters = click.option(
    "--adapter",
    "adapters",
    multiple=True,
    required=True,
    type=_path,
    help="PEFT VeRA adapter directory; repeat for several (folded in order, or a bank's rows in order).",
)
_quiet = click.option("--quiet", is_flag=True, help="No progress bar.")
_json = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
_allow_pickle = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Read adapter_model.bin with torch.load(weights_only=True) if there is no safetensors.",
)
_rounding = click.option(
    "--rounding",
    type=click.Choice([r.value for r in Rounding]),
    default=Rounding.FMA.value,
    show_default=True,
    help="CPU rounding to reproduce when regenerating projections: 'separate' for adapters trained on CPUs without AVX2.",
)


def _write_options(f):
    for option in (
        click.option("--device", default="cpu", show_default=True, help="Where the fold runs, e.g. cuda."),
        click.option(
            "--force", is_flag=True, help="Replace a non-empty output directory once the new one is complete."
        ),
        click.option(
            "--fsync", is_flag=True, help="Wait until the output is on disk before putting it in place."
        ),
        _allow_pickle,
        _rounding,
        _quiet,
        _json,
    ):
        f = option(f)
    return f


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="vera-export")
def main(debug: bool) -> None:
    """Merge, verify and export PEFT VeRA adapters without PEFT.

    \b
    Example:
      vera-export merge --base fixtures/tiny-llama --adapter fixtures/tiny-llama-vera --output out/merged --verify
    """


@main.command("merge")
@click.option("--base", required=True, type=_path, help="Base model directory (config.json + safetensors).")
@_adapters
@click.option("--output", required=True, type=_path, help="Directory for the merged checkpoint.")
@click.option(
    "--verify/--no-verify", "run_verify", default=False, help="Verify the merged checkpoint afterwards."
)
@_write_options
def merge_command(
    base, adapters, output, run_verify, device, force, fsync, allow_pickle, rounding, quiet, as_json
):
    """Fold VeRA adapters into a base checkpoint, correctly rounded, streaming shard by shard.

    \b
    Example:
      vera-export merge --base ./llama --adapter ./my-vera --output ./llama-merged --verify
    """
    options = MergeOptions(
        device=device,
        force=force,
        fsync=fsync,
        allow_pickle=allow_pickle,
        rounding=Rounding(rounding),
        progress=not quiet,
    )
    report = merge(base, adapters, output, options)
    _warn(report.warnings)
    result = {"merge": report.to_json()}
    if not as_json:
        click.echo(
            f"merged {len(report.adapters)} adapter(s) into {output}: {len(report.folded)} weights folded, "
            f"{len(report.replaced)} tensors replaced, {report.copied} copied ({report.seconds:.1f} s)"
        )
    if run_verify:
        verdict = verify(base, adapters, output, options=options)
        result["verify"] = verdict.to_json()
        _print_verification(verdict, as_json=as_json, quiet=quiet)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    if run_verify and not verdict.passed:
        sys.exit(EXIT_FAILED)


@main.command("unmerge")
@click.option("--merged", required=True, type=_path, help="Merged model directory.")
@_adapters
@click.option("--output", required=True, type=_path, help="Directory for the restored base checkpoint.")
@_write_options
def unmerge_command(merged, adapters, output, device, force, fsync, allow_pickle, rounding, quiet, as_json):
    """Subtract VeRA adapters from a merged checkpoint.

    Trained biases and modules_to_save that the merge replaced cannot be restored and are reported.

    \b
    Example:
      vera-export unmerge --merged ./llama-merged --adapter ./my-vera --output ./llama-restored
    """
    options = MergeOptions(
        device=device,
        force=force,
        fsync=fsync,
        allow_pickle=allow_pickle,
        rounding=Rounding(rounding),
        progress=not quiet,
    )
    report = unmerge(merged, adapters, output, options)
    _warn(report.warnings)
    if as_json:
        click.echo(json.dumps({"unmerge": report.to_json()}, indent=2))
    else:
        click.echo(
            f"unmerged {len(report.adapters)} adapter(s) into {output}: {len(report.folded)} weights restored ({report.seconds:.1f} s)"
        )


@main.command("inspect")
@click.argument("adapter", type=_path)
@click.option("--base", type=_path, help="Also check the adapter against this base model directory.")
@_allow_pickle
@_json
def inspect_command(adapter, base, allow_pickle, as_json):
    """Describe an adapter and, with --base, every incompatibility with that base.

    Exits 1 when --base is given and the adapter does not fit it.

    \b
    Example:
      vera-export inspect ./my-vera --base ./llama --json
    """
    report = inspect(adapter, base, allow_pickle=allow_pickle)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.text())
    if base is not None and not report.compatible:
        sys.exit(EXIT_FAILED)


@main.command("verify")
@click.option("--base", required=True, type=_path, help="Base model directory.")
@_adapters
@click.option("--merged", type=_path, help="Merged model directory to check.")
@click.option(
    "--onnx", "onnx_dir", type=_path, help="Directory written by `vera-export onnx` to check instead."
)
@click.option(
    "--full-model/--layers-only",
    default=None,
    help="Compare whole-model outputs too (default: when two copies fit in memory). --merged only.",
)
@_allow_pickle
@_rounding
@_quiet
@_json
def verify_command(base, adapters, merged, onnx_dir, full_model, allow_pickle, rounding, quiet, as_json):
    """Check a merged checkpoint or an ONNX export against the unmerged VeRA model; exit 1 if any check fails.

    With --onnx, the graph runs in ONNX Runtime on two input shapes; the projections are regenerated with the
    rounding recorded at export, so --rounding does not apply.

    \b
    Examples:
      vera-export verify --base ./llama --adapter ./my-vera --merged ./llama-merged --json
      vera-export verify --base ./llama --adapter ./my-vera --onnx ./llama-onnx
    """
    if (merged is None) == (onnx_dir is None):
        raise click.UsageError("pass exactly one of --merged and --onnx")
    if onnx_dir is not None:
        from .onnx_export import verify_onnx  # ONNX's libraries take seconds to import: only when asked

        report = verify_onnx(onnx_dir, base, adapters, allow_pickle=allow_pickle)
    else:
        options = MergeOptions(allow_pickle=allow_pickle, rounding=Rounding(rounding), progress=not quiet)
        report = verify(base, adapters, merged, full_model=full_model, options=options)
    _print_verification(report, as_json=as_json, quiet=quiet)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    if not report.passed:
        sys.exit(EXIT_FAILED)


@main.command("onnx")
@click.option("--base", required=True, type=_path, help="Base model directory (config.json + safetensors).")
@_adapters
@click.option(
    "--output", required=True, type=_path, help="Directory for model.onnx, vera_export.json and the config."
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="merged",
    show_default=True,
    help="merged: adapters folded into the weights; adapter: one adapter kept as swappable graph inputs; "
    "bank: every adapter in one graph, chosen per batch row by the adapter_index input.",
)
@click.option(
    "--task",
    type=click.Choice(["auto", *TASKS]),
    default="auto",
    show_default=True,
    help="What the graph returns; auto reads config.json's architecture.",
)
@click.option(
    "--opset",
    type=click.IntRange(MIN_OPSET, MAX_OPSET),
    default=MIN_OPSET,
    show_default=True,
    help="ONNX opset.",
)
@click.option(
    "--verify/--no-verify",
    "run_verify",
    default=True,
    show_default=True,
    help="Compare the graph in ONNX Runtime with the unmerged model in PyTorch.",
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Weights in model.onnx.data (default: only past 1.75 GiB; protobuf cannot hold 2 GiB).",
)
@click.option(
    "--force", is_flag=True, help="Replace a non-empty output directory once the new one is complete."
)
@_allow_pickle
@_rounding
@_quiet
@_json
def onnx_command(
    base,
    adapters,
    output,
    mode,
    task,
    opset,
    run_verify,
    external_data,
    force,
    allow_pickle,
    rounding,
    quiet,
    as_json,
):
    """Export the base model with VeRA adapters to ONNX; exit 1 if the graph fails verification.

    \b
    Examples:
      vera-export onnx --base ./llama --adapter ./my-vera --output ./llama-onnx --mode adapter
      vera-export onnx --base ./llama --adapter ./alice-vera --adapter ./bob-vera --output ./llama-bank --mode bank
    """
    from .onnx_export import onnx

    options = OnnxOptions(
        mode=mode,
        task=task,
        opset=opset,
        verify=run_verify,
        external_data=external_data,
        force=force,
        allow_pickle=allow_pickle,
        rounding=Rounding(rounding),
        progress=not quiet,
    )
    report = onnx(base, adapters, output, options)
    _warn(report.warnings)
    if not as_json:
        click.echo(
            f"exported {report.task} graph ({report.mode} mode, {report.overridable} overridable tensors) to {output}: "
            f"{', '.join(report.files)} ({report.seconds:.1f} s)"
        )
    if report.verification is not None:
        _print_verification(report.verification, as_json=as_json, quiet=quiet)
    if as_json:
        click.echo(json.dumps({"onnx": report.to_json()}, indent=2))
    if report.verification is not None and not report.verification.passed:
        sys.exit(EXIT_FAILED)


@main.command("onnx-adapter")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=_path,
    help="Directory written by `vera-export onnx --mode adapter` or `--mode bank`.",
)
@click.option(
    "--adapter",
    "adapters",
    required=True,
    multiple=True,
    type=_path,
    help="PEFT VeRA adapter of the same base and projections; for a bank graph, repeat it: row k of the new bank is "
    "the k-th --adapter.",
)
@click.option("--output", required=True, type=_path, help="The .onnx_adapter file to write.")
@click.option("--force", is_flag=True, help="Replace an existing file.")
@_allow_pickle
@_json
def onnx_adapter_command(model_dir, adapters, output, force, allow_pickle, as_json):
    """Write VeRA adapters as an ONNX Runtime adapter file for a graph exported in adapter or bank mode.

    Load it with onnxruntime.LoraAdapter and apply it per run with RunOptions.add_active_adapter. An adapter-mode
    graph takes one --adapter; a bank graph takes any number of them, and the file replaces the whole bank.

    \b
    Examples:
      vera-export onnx-adapter --model ./llama-onnx --adapter ./other-vera --output ./other.onnx_adapter
      vera-export onnx-adapter --model ./llama-bank --adapter ./dave-vera --adapter ./erin-vera --output ./team.onnx_adapter
    """
    from .ort_adapter import onnx_adapter

    report = onnx_adapter(model_dir, list(adapters), output, force=force, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps({"onnx_adapter": report.to_json()}, indent=2))
    else:
        click.echo(f"wrote {report.parameters} parameters to {report.output} ({report.bytes_written} bytes)")


@main.command("to-lora")
@click.option("--base", required=True, type=_path, help="Base model directory (config.json + safetensors).")
@click.option("--adapter", required=True, type=_path, help="PEFT VeRA adapter directory.")
@click.option("--output", required=True, type=_path, help="Directory for the PEFT LoRA adapter.")
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="Best rank-K approximation of each layer (default: the exact export at the adapter's r).",
)
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default="float32",
    show_default=True,
    help="Dtype of lora_A / lora_B.",
)
@click.option(
    "--force", is_flag=True, help="Replace a non-empty output directory once the new one is complete."
)
@_allow_pickle
@_rounding
@_quiet
@_json
def to_lora_command(base, adapter, output, rank, dtype, force, allow_pickle, rounding, quiet, as_json):
    """Export a VeRA adapter as a plain PEFT LoRA adapter, exactly or truncated to rank K.

    Warns where vLLM would refuse the result (rank above 16, modules_to_save, trained biases).

    \b
    Example:
      vera-export to-lora --base ./llama --adapter ./my-vera --output ./my-lora --rank 16
    """
    options = MergeOptions(
        force=force, allow_pickle=allow_pickle, rounding=Rounding(rounding), progress=not quiet
    )
    report = to_lora(base, adapter, output, rank=rank, dtype=dtype, options=options)
    _warn(report.warnings)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.text())


@main.command("embed-projections")
@click.option("--base", required=True, type=_path, help="Base model directory the adapter is used with.")
@click.option(
    "--adapter", required=True, type=_path, help="PEFT VeRA adapter saved with save_projection=False."
)
@click.option(
    "--output", required=True, type=_path, help="Directory for the adapter with projections embedded."
)
@click.option(
    "--force", is_flag=True, help="Replace a non-empty output directory once the new one is complete."
)
@_allow_pickle
@_rounding
@_json
def embed_projections_command(base, adapter, output, force, allow_pickle, rounding, as_json):
    """Store the projections PEFT regenerates for this base in a copy of the adapter (save_projection true).

    \b
    Example:
      vera-export embed-projections --base ./llama --adapter ./my-vera --output ./my-vera-embedded
    """
    options = MergeOptions(
        force=force, allow_pickle=allow_pickle, rounding=Rounding(rounding), progress=False
    )
    report = embed_projections(base, adapter, output, options)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.text())


def _print_verification(report, as_json: bool, quiet: bool) -> None:
    _warn(report.warnings)
    if as_json:
        return
    for check in report.checks:
        if not quiet or not check.passed:
            click.echo(check.line())
    click.echo(report.summary())
