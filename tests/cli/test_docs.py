"""Every example in README.md and docs/ runs as written, and the docs name every option their command has.

Each document runs in a fresh directory holding the names its examples use: `llama` (a tiny Llama), `my-vera`
(an all-linear adapter whose projections are regenerated from its key; `llama` has a tokenizer), `second-vera` (another adapter of
`llama`), `other-vera` and `alice-vera` ... `erin-vera` (siblings of `my-vera`: same projections, other
lambdas), `fixtures` (the repository's own, for the quick start), and a Hugging Face cache in which
`TinyLlama/TinyLlama-1.1B-Chat-v1.0` is `llama`, laid out as huggingface_hub lays it out and read offline. Bash blocks run through the CLI, command by
command, in order, each expected to exit 0 unless the line before the block says `<!-- exit N -->`; Python blocks
run as scripts. `<!-- not run: reason -->` before a block skips it.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures.build import BASES, build_adapter, build_tokenizer
from tests.helpers import base_dir, hub_cache
from vera_export import cli

ROOT = Path(__file__).parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SIBLINGS = ["other", "alice", "bob", "carol", "dave", "erin"]
HUB_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
# The commands each page documents: it must name every one of their options.
PAGES = {
    "merge.md": ["merge", "unmerge"],
    "verify.md": ["verify"],
    "inspect.md": ["inspect"],
    "onnx.md": ["onnx", "onnx-adapter"],
    "to-lora.md": ["to-lora"],
    "embed-projections.md": ["embed-projections"],
}
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
_MARKER = re.compile(r"<!-- (exit (\d+)|not run: .*?) -->\s*$")


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int
    exit_code: int = 0
    skip: str | None = None


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the marker on the line before each, if any."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        exit_code, skip = 0, None
        if marker and marker.group(2):
            exit_code = int(marker.group(2))
        elif marker:
            skip = marker.group(1)
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(match.group(1), match.group(2), line, exit_code, skip))
    return found


def commands(block: Block) -> list[list[str]]:
    """The `vera-export` invocations of a shell block, `.venv/bin/` or not; set-up steps (venv, pip) and the
    test command are what CI itself runs, and are left out."""
    joined = block.code.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        for step in line.split("&&"):
            words = shlex.split(step)
            if words and Path(words[0]).name == "vera-export":
                found.append(words[1:])
    return found


@pytest.fixture(scope="session")
def world(fixture_root, tmp_path_factory) -> Path:
    """The names the examples use, built once and copied for each document."""
    root = tmp_path_factory.mktemp("docs-world")
    shutil.copytree(base_dir(fixture_root, "llama-all-noproj"), root / "llama")
    build_tokenizer(root / "llama", BASES["llama"].config["vocab_size"])  # for the text-generation examples
    build_adapter("llama-all-noproj", root / "llama", root / "my-vera", base_name="llama")
    build_adapter("llama-qv", root / "llama", root / "second-vera", base_name="llama")
    for seed, name in enumerate(SIBLINGS, start=201):
        build_adapter("llama-all-noproj", root / "llama", root / f"{name}-vera", base_name="llama", seed=seed)
    (root / "fixtures").symlink_to(ROOT / "fixtures")
    hub_cache(root / "hub", HUB_ID, root / "llama")
    return root


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_examples_run(document: Path, world: Path, tmp_path: Path, monkeypatch) -> None:
    """Every shell and Python example of the document, in order, in a directory of its own."""
    here = tmp_path / "world"
    shutil.copytree(world, here, symlinks=True)
    monkeypatch.chdir(here)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(here / "hub"))
    ran = 0
    for block in blocks(document):
        where = f"{document.name}:{block.line}"
        if block.skip or block.language not in ("bash", "python"):
            continue
        if block.language == "python":
            exec(compile(block.code, where, "exec"), {"__name__": "__main__"})
            ran += 1
            continue
        for args in commands(block):
            result = CliRunner().invoke(cli.main, args)
            assert result.exit_code == block.exit_code, (
                f"{where}: vera-export {shlex.join(args)}\n{result.output}"
            )
            assert result.exception is None or isinstance(result.exception, SystemExit), where
            ran += 1
    if document.name not in ("json.md", "guarantees.md", "precision.md", "performance.md"):
        assert ran, f"{document.name} has no example that runs"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_pages_name_every_option(page: str) -> None:
    """A command's page mentions each of its flags, so a new option cannot go undocumented."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    for name in PAGES[page]:
        command = cli.main.commands[name]
        flags = [
            opt for param in command.params for opt in param.opts if opt.startswith("--") and opt != "--help"
        ]
        missing = [flag for flag in flags if flag not in text]
        assert not missing, f"{page} does not mention {name}'s {', '.join(missing)}"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    headings = re.findall(r"^#+ (.+)$", _FENCE.sub("", path.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_links_resolve(document: Path) -> None:
    """Relative links point at files that exist, and anchors at headings they have."""
    text = _FENCE.sub("", document.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        assert path.exists(), f"{document.name}: link to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{document.name}: link to {target}, which has no such heading"
