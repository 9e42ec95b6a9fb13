"""Helpers shared by the tests: fixture paths, PEFT as the reference, and the command line run in process."""

from __future__ import annotations

import hashlib
import json
import signal
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import torch
import transformers
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from fixtures.build import ADAPTERS, BASES
from vera_export.cli import main
from vera_export.fold import VeraDelta
from vera_export.precision import ulp


def base_dir(root: Path, adapter: str) -> Path:
    return root / "bases" / ADAPTERS[adapter].base


def adapter_dir(root: Path, adapter: str) -> Path:
    return root / "adapters" / adapter


def load_base(path: Path, dtype: torch.dtype | str = "auto") -> torch.nn.Module:
    """The base model as transformers loads it, eval mode, no KV cache."""
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    return model.eval()


def load_peft(base: Path, adapters: Sequence[Path], dtype: torch.dtype | str = "auto") -> torch.nn.Module:
    """PEFT's unmerged VeRA model with every adapter active: the reference everything is checked against."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_base(base, dtype), adapters[0], adapter_name="a0")
        for i, path in enumerate(adapters[1:], start=1):
            model.load_adapter(path, adapter_name=f"a{i}")
        model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return model.eval()


def sample_inputs(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


ALL_ADAPTERS = list(ADAPTERS)
# Adapters that change one side of a tied pair: the merge stores both tensors, untied.
UNTYING_ADAPTERS = ["llama-tied-embed", "llama-tied-lmhead", "llama-gen-tied-head"]
ALL_BASES = list(BASES)


def restore_sigint() -> None:
    """For subprocesses (`preexec_fn`): Ctrl-C back to its default, so Python turns it into KeyboardInterrupt even
    where the suite was started with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --- the command line -------------------------------------------------------------------------------------------


def run_cli(*args: object) -> Result:
    """`vera-export ARGS` in this process, exceptions not caught: a traceback fails the test, as it would a user."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def cli_merge(tmp_path: Path, base: Path, adapter: Path, *extra: str, output: Path | None = None) -> Result:
    """`vera-export merge --quiet` of one adapter into `output` (default `tmp_path/out`)."""
    output = output or tmp_path / "out"
    return run_cli("merge", "--base", base, "--adapter", adapter, "--output", output, "--quiet", *extra)


def assert_one_error_line(result: Result, *fragments: str) -> None:
    """Exit 2 and exactly one line on stderr, `error: ...` holding every fragment; no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def digest(*paths: Path) -> str:
    """A hash of every file under the paths: inputs must come out of a failed run byte-identical."""
    h = hashlib.sha256()
    for root in paths:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            h.update(str(path).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def assert_clean_failure(
    result: Result, tmp_path: Path, digest_before: str, inputs: tuple[Path, ...], *fragments: str
) -> None:
    """A failed `cli_merge`: one `error:` line with the fragments, exit 2, no output or staging directory left
    in `tmp_path`, and the inputs byte-identical to `digest_before`."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(".out.")]
    assert leftovers == [], leftovers
    assert digest(*inputs) == digest_before


def edit_config(adapter: Path, **changes: object) -> None:
    """Change fields of an adapter directory's `adapter_config.json` in place."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Rewrite a safetensors file with `change` applied to its tensors (a dict, changed in place)."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def pickle_adapter(adapter: Path) -> None:
    """Replace an adapter's safetensors weights by the same tensors in a `torch.save` pickle."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")


def hub_cache(cache: Path, repo_id: str, source: Path, commit: str = "a" * 40, main: bool = True) -> Path:
    """Lay `source`'s files out as huggingface_hub caches repository `repo_id` at `commit` under `cache`:
    content-addressed blobs, a snapshot of relative symlinks into them, and `refs/main` (when `main`)."""
    import hashlib
    import os

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / file.name)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return repo


# --- the fold against exact arithmetic ---------------------------------------------------------------------


def exact_fold(
    weight: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[list[Fraction]]:
    """`weight + sum(left @ right)` in exact rational arithmetic."""
    rows, cols = weight.shape
    exact = [[Fraction(float(weight[i, j])) for j in range(cols)] for i in range(rows)]
    for left, right in factors:
        left_f = [[Fraction(float(v)) for v in row] for row in left.double().tolist()]
        right_f = [[Fraction(float(v)) for v in row] for row in right.double().tolist()]
        for i in range(rows):
            for j in range(cols):
                exact[i][j] += sum(left_f[i][k] * right_f[k][j] for k in range(len(right_f)))
    return exact


def ulp_errors(result: torch.Tensor, exact: list[list[Fraction]]) -> torch.Tensor:
    """|result - exact| in units of the result's ulp, element by element."""
    spacing = ulp(result, result.dtype)
    errors = [
        [
            float(abs(Fraction(float(result[i, j])) - exact[i][j]) / Fraction(float(spacing[i, j])))
            for j in range(result.shape[1])
        ]
        for i in range(result.shape[0])
    ]
    return torch.tensor(errors)


def random_delta(rows: int, cols: int, r: int, fan_in_fan_out: bool, seed: int = 0) -> VeraDelta:
    g = torch.Generator().manual_seed(seed)
    in_features, out_features = (rows, cols) if fan_in_fan_out else (cols, rows)
    lambda_b = torch.randn(out_features, generator=g) * 0.1
    lambda_d = torch.randn(r, generator=g) * 0.5
    vera_A = torch.rand(r, in_features + 3, generator=g) - 0.5  # wider than the layer: sliced, as in PEFT
    vera_B = torch.rand(out_features + 5, r, generator=g) - 0.5
    return VeraDelta(lambda_b, lambda_d, vera_A, vera_B, in_features, out_features, fan_in_fan_out)


def cancelling_weight(
    dtype: torch.dtype, left: torch.Tensor, right: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """A weight where a quarter of the elements are -delta rounded to `dtype`: near-total cancellation."""
    g = torch.Generator().manual_seed(seed)
    delta = left.double() @ right.double()
    weight = (torch.randn(delta.shape, generator=g, dtype=torch.float64) * delta.abs().mean()).to(dtype)
    mask = torch.rand(delta.shape, generator=g) < 0.25
    weight[mask] = (-delta).to(dtype)[mask]
    return weight
