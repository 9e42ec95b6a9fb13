"""What the ONNX tests share: the graphs they export (once per session, on first use), PEFT's outputs to hold them
to, and sibling adapters of the fixtures made with PEFT.

Float32 graphs against PEFT's float32 model: the two round differently, by a few float32 roundoffs of outputs of
magnitude about 1 (3e-7 at most here); the adapters move the outputs by more than `APART` (checked by the tests).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fixtures.build import ADAPTERS, randomize_trainables
from tests.helpers import adapter_dir, base_dir, load_base, load_peft
from vera_export import OnnxOptions
from vera_export.onnx.export import OnnxReport, export_onnx
from vera_export.onnx.runtime import session
from vera_export.onnx.signature import ADAPTER_INDEX

ATOL, RTOL = 2e-6, 1e-5
APART = 1e-2
# Neither shape is the export's example (2 x 8); one has batch 1, the first row of the other is left-padded.
SHAPES = [(1, 5), (3, 12)]
# Bank batches: adapters repeat and come in another order than exported.
BATCHES = [((4, 6), [2, 0, 1, 0]), ((1, 9), [1])]
# The seed of the sibling an adapter-mode graph swaps in.
SIBLING = 100


@dataclass(frozen=True)
class ExportSpec:
    fixture: str
    adapters: tuple[str, ...]
    mode: str
    task: str = "auto"
    external_data: bool | None = None
    opset: int = 18


EXPORT_SPECS = {
    "llama-adapter": ExportSpec("llama-qv", ("llama-qv",), "adapter"),
    "llama-merged": ExportSpec("llama-qv", ("llama-qv", "llama-qkv-b"), "merged", opset=23),
    "gpt2-adapter": ExportSpec("gpt2-attn", ("gpt2-attn",), "adapter", external_data=True),
    "gpt2-merged": ExportSpec("gpt2-attn", ("gpt2-attn",), "merged"),
    "bert-adapter": ExportSpec("bert-cls", ("bert-cls",), "adapter"),
    "bert-merged": ExportSpec("bert-cls", ("bert-cls",), "merged"),
    "bert-features": ExportSpec("bert-cls", ("bert-cls",), "adapter", task="feature-extraction"),
    # A trained copy of the embedding that the base ties to lm_head: the head must keep the original.
    "llama-tied-adapter": ExportSpec("llama-tied-embed", ("llama-tied-embed",), "adapter"),
    # The head adapted where the base ties it to the embedding: the embedding must keep the original.
    "llama-tied-head-merged": ExportSpec("llama-tied-lmhead", ("llama-tied-lmhead",), "merged"),
    "llama-tied-head-adapter": ExportSpec("llama-tied-lmhead", ("llama-tied-lmhead",), "adapter"),
}
ADAPTER_EXPORTS = [key for key, spec in EXPORT_SPECS.items() if spec.mode == "adapter"]

# GPT-2 with Conv1D and LayerNorm tensors in modules_to_save, on top of gpt2-attn's trained biases.
_GPT2_BANK = {"target_modules": ["c_attn", "attn.c_proj", "c_fc"], "modules_to_save": ["mlp.c_proj", "ln_f"]}


@dataclass(frozen=True)
class BankSpec:
    """Three adapters in one bank graph.

    - llama: two fixtures and a sibling; `llama-qv` adapts q and v only, the others k too (zero lambdas there);
    - bert: a classifier with trained biases and a `modules_to_save` head, selected per row;
    - gpt2: `Conv1D` layers (`fan_in_fan_out`) with trained biases, and a `Conv1D` and a `LayerNorm` in
      `modules_to_save`.
    """

    fixture: str  # the fixture whose base and config the bank uses
    adapters: tuple[tuple[str, int], ...]  # (fixture, 0) is the fixture itself; (fixture, seed) a sibling
    changes: tuple[tuple[str, object], ...] = ()  # config changes of the siblings


BANK_SPECS = {
    "llama": BankSpec("llama-qv", (("llama-qv", 0), ("llama-qkv-b", 0), ("llama-qv", 101))),
    "bert": BankSpec("bert-cls", (("bert-cls", 0), ("bert-cls", 101), ("bert-cls", 102))),
    "gpt2": BankSpec(
        "gpt2-attn", (("gpt2-attn", 101), ("gpt2-attn", 102), ("gpt2-attn", 103)), tuple(_GPT2_BANK.items())
    ),
}


@dataclass
class Export:
    spec: ExportSpec | BankSpec
    base: Path
    adapters: list[Path]
    directory: Path
    report: OnnxReport


class Siblings:
    """Other adapters of a fixture's config, made with PEFT as the fixtures are, with other random trainables."""

    def __init__(self, root: Path, out: Path) -> None:
        self.root, self.out, self.built = root, out, {}

    def __call__(self, fixture: str, seed: int = 0, **changes) -> Path:
        if seed == 0 and not changes:
            return adapter_dir(self.root, fixture)
        key = repr((fixture, seed, sorted(changes.items())))
        if key not in self.built:
            from peft import VeraConfig, get_peft_model

            spec = ADAPTERS[fixture]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = VeraConfig(**{**spec.config, **changes}, task_type=spec.task_type)
                model = get_peft_model(load_base(base_dir(self.root, fixture)), config)
            randomize_trainables(model, seed)
            self.built[key] = self.out / f"{fixture}-{len(self.built)}"
            model.save_pretrained(self.built[key])
        return self.built[key]


class Exports:
    """The graphs of `EXPORT_SPECS`, exported on first use, so running one test exports only the graph it needs."""

    def __init__(self, root: Path, out: Path) -> None:
        self.root, self.out, self.done = root, out, {}

    def __getitem__(self, key: str) -> Export:
        if key not in self.done:
            spec = EXPORT_SPECS[key]
            base = base_dir(self.root, spec.fixture)
            adapters = [adapter_dir(self.root, a) for a in spec.adapters]
            options = OnnxOptions(
                mode=spec.mode, task=spec.task, external_data=spec.external_data, opset=spec.opset
            )
            report = export_onnx(base, adapters, self.out / key, options)
            self.done[key] = Export(spec, base, adapters, self.out / key, report)
        return self.done[key]


class Banks:
    """The bank graphs of `BANK_SPECS`, exported on first use."""

    def __init__(self, siblings: Siblings, out: Path) -> None:
        self.siblings, self.out, self.done = siblings, out, {}

    def adapters(self, key: str) -> list[Path]:
        spec = BANK_SPECS[key]
        return [self.siblings(fixture, seed, **dict(spec.changes)) for fixture, seed in spec.adapters]

    def __getitem__(self, key: str) -> Export:
        if key not in self.done:
            spec = BANK_SPECS[key]
            base, adapters = base_dir(self.siblings.root, spec.fixture), self.adapters(key)
            report = export_onnx(base, adapters, self.out / key, OnnxOptions(mode="bank"))
            self.done[key] = Export(spec, base, adapters, self.out / key, report)
        return self.done[key]


def vocab_size(export: Export) -> int:
    return json.loads((export.base / "config.json").read_text())["vocab_size"]


def run_graph(export: Export, batches, run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
    """The graph's output on each batch, in ONNX Runtime."""
    runner = session(export.directory)
    return [runner.run(None, batch, run_options)[0] for batch in batches]


def lora_run_options(path: Path) -> tuple[ort.RunOptions, ort.LoraAdapter]:
    """Run options that apply the adapter file at `path`."""
    lora = ort.LoraAdapter()
    lora.Load(str(path))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(lora)
    return run_options, lora  # the LoraAdapter must outlive the runs; RunOptions does not hold on to it


# --- graphs of one adapter (or several merged) -----------------------------------------------------------------


def token_batches(vocab_size: int) -> list[dict[str, np.ndarray]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for batch, length in SHAPES:
        input_ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, : length // 3] = 0
        batches.append({"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    return batches


@torch.no_grad()
def peft_outputs(export: Export, adapters: list[Path] | None, batches) -> list[np.ndarray]:
    """PEFT's unmerged model (or the bare base, with `adapters=[]`) on `batches`: what the graph must compute."""
    adapters = export.adapters if adapters is None else adapters
    model = load_peft(export.base, adapters).base_model.model if adapters else load_base(export.base)
    if export.spec.task == "feature-extraction":
        model, key = model.base_model, "last_hidden_state"
    else:
        key = "logits"
    return [getattr(model(**{k: torch.from_numpy(v) for k, v in b.items()}), key).numpy() for b in batches]


def assert_matches(got: list[np.ndarray], want: list[np.ndarray], batches, atol: float = ATOL) -> None:
    """Equal within tolerance at every position the attention mask keeps (padded ones mean nothing)."""
    for g, w, batch in zip(got, want, batches):
        keep = batch["attention_mask"].astype(bool)
        g, w = (g[keep], w[keep]) if g.ndim == 3 else (g, w)
        torch.testing.assert_close(torch.from_numpy(g), torch.from_numpy(w), atol=atol, rtol=RTOL)


# --- bank graphs -----------------------------------------------------------------------------------------------


def bank_batches(vocab_size: int, shapes=BATCHES) -> list[dict[str, np.ndarray]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for (rows, length), index in shapes:
        input_ids = torch.randint(0, vocab_size, (rows, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, : length // 3] = 0
        batches.append(
            {
                "input_ids": input_ids.numpy(),
                "attention_mask": attention_mask.numpy(),
                ADAPTER_INDEX: np.array(index, dtype=np.int64),
            }
        )
    return batches


@torch.no_grad()
def peft_logits(base: Path, adapter: Path, batches) -> list[np.ndarray]:
    """PEFT's unmerged model of one adapter on every row of `batches`."""
    model = load_peft(base, [adapter])
    return [
        model(
            input_ids=torch.from_numpy(b["input_ids"]), attention_mask=torch.from_numpy(b["attention_mask"])
        ).logits.numpy()
        for b in batches
    ]


def _kept(output: np.ndarray, batch, row: int) -> np.ndarray:
    """One row's output at the positions its attention mask keeps (padded ones mean nothing)."""
    if output.ndim == 2:  # [batch, labels]
        return output[row]
    return output[row][batch["attention_mask"][row].astype(bool)]


def assert_rows_match(got, batches, adapters: list[Path], base: Path) -> None:
    """Row i of each batch equals PEFT's model of adapter `adapter_index[i]`, and no other adapter's."""
    references = [peft_logits(base, adapter, batches) for adapter in adapters]
    for g, batch, *by_adapter in zip(got, batches, *references):
        for row, k in enumerate(batch[ADAPTER_INDEX]):
            want = torch.from_numpy(_kept(by_adapter[k], batch, row))
            torch.testing.assert_close(torch.from_numpy(_kept(g, batch, row)), want, atol=ATOL, rtol=RTOL)
            # The check can fail: the row is far from what any other adapter computes for it.
            others = [j for j in range(len(adapters)) if j != k]
            assert all(
                np.abs(_kept(g, batch, row) - _kept(by_adapter[j], batch, row)).max() > APART for j in others
            )


@dataclass(frozen=True)
class Package:
    """A text-generation package, exported (and verified) once per session."""

    base: Path
    adapter: Path
    mode: str
    precision: str
    directory: Path
    report: OnnxReport


class Packages:
    """`packages[adapter, mode, precision]`: the adapter fixture's text-generation package, exported on first use."""

    def __init__(self, root: Path, out: Path) -> None:
        self.root, self.out, self.done = root, out, {}

    def __getitem__(self, key: tuple[str, str, str]) -> Package:
        if key not in self.done:
            adapter, mode, precision = key
            base = base_dir(self.root, adapter)
            directory = self.out / "-".join(key)
            options = OnnxOptions(task="text-generation", mode=mode, precision=precision, progress=False)
            report = export_onnx(base, [adapter_dir(self.root, adapter)], directory, options)
            self.done[key] = Package(
                base, adapter_dir(self.root, adapter), mode, precision, directory, report
            )
        return self.done[key]
