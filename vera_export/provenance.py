"""What a merged checkpoint was made from: the record `merge` and `unmerge` write, and the model card.

The record says which tool and version wrote the checkpoint, by which precision rule, from which base, and which
adapters are folded into it, each with the SHA-256 of its files (and its Hub ID and revision when it came from
the Hub). It is written twice: in full as `vera_export.json` beside the shards, and, without the base's file
digests (computed while the shards are written), in every shard's safetensors metadata under `vera_export`, so
that a shard copied on its own still says what it holds. A base that carries a record passes it on: merging into
a merged model adds to its list of adapters, unmerging takes away, and merging an adapter the list already holds
is refused (it would be folded in twice).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .config import CONFIG_NAME
from .errors import CheckpointError, IncompatibleAdapterError, quoted
from .io.hub import snapshot_origin
from .io.index import INDEX_NAME, ShardedTensorIndex

if TYPE_CHECKING:
    from .adapter import VeraAdapter

RECORD_NAME = "vera_export.json"
METADATA_KEY = "vera_export"
FORMAT = "vera-export merge record"
CARD_NAME = "README.md"
PRECISION_RULE = (
    "each weight rounded once from W + delta_W, to within 1 ulp of the exact sum (products in float32 for 16-bit "
    "weights, float64 for float32; cancelling elements recomputed in float64 or exactly)"
)
_CHUNK = 8 * 1024 * 1024


def tool_version() -> str:
    try:
        return metadata.version("vera-export")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def describe(directory: Path, files: Iterable[str]) -> dict[str, Any]:
    """Where an input came from and the SHA-256 of each of `files` (names relative to `directory`)."""
    entry: dict[str, Any] = {"location": str(directory), **_hub_fields(directory)}
    entry["sha256"] = {name: file_digest(directory / name) for name in sorted(files)}
    return entry


def describe_adapter(adapter: VeraAdapter) -> dict[str, Any] | None:
    """`describe` of an adapter's config and weights file; None for one not read from files."""
    if adapter.weights_file is None:
        return None
    return describe(adapter.path, [CONFIG_NAME, adapter.weights_file.name])


def file_digest(path: Path) -> str:
    """The file's SHA-256: in a Hub cache snapshot, read off the blob name when it is one (large files are stored
    under their SHA-256 there), else computed."""
    known = _blob_digest(path)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)  # hashlib lets other threads run while it hashes a large chunk
    return digest.hexdigest()


def _blob_digest(path: Path) -> str | None:
    """The SHA-256 a Hub cache snapshot's file is stored under, or None for any other file."""
    if path.is_symlink() and snapshot_origin(path.parent) is not None:
        blob = Path(os.readlink(path))
        if (
            blob.parent.name == "blobs"
            and len(blob.name) == 64
            and all(c in "0123456789abcdef" for c in blob.name)
        ):
            return blob.name
    return None


@dataclass
class Record:
    """A merged checkpoint's record (see the module docstring).

    Attributes:
        base: The original base: location, Hub ID and revision when known, and its files' SHA-256 (empty until
            `hash_base` has run).
        adapters: Every adapter folded in, oldest first, each as `describe` gives it.
        version: The vera-export version that wrote the record.
    """

    base: dict[str, Any]
    adapters: list[dict[str, Any]] = field(default_factory=list)
    version: str = field(default_factory=tool_version)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "tool": "vera-export",
            "version": self.version,
            "precision": PRECISION_RULE,
            "base": self.base,
            "adapters": self.adapters,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Record:
        """The record `to_json` gave (unchecked: for records this process wrote or `read_record` checked)."""
        return cls(base=raw["base"], adapters=raw["adapters"], version=raw["version"])

    def metadata(self) -> str:
        """The record for shard metadata: without the base's digests, which are not known yet."""
        shallow = self.to_json()
        shallow["base"] = {k: v for k, v in self.base.items() if k != "sha256"}
        return json.dumps(shallow, separators=(",", ":"), sort_keys=True)

    def lists(self, entry: dict[str, Any] | None) -> bool:
        """Whether the adapter `entry` (from `describe_adapter`) is among the adapters merged in."""
        return entry is not None and any(same_adapter(entry, a) for a in self.adapters)

    def summary(self) -> str:
        names = ", ".join(_name(a) for a in self.adapters) or "none"
        return f"base {_name(self.base)}; adapters merged in: {names} (vera-export {self.version})"


def _name(entry: dict[str, Any]) -> str:
    if "hub_id" in entry:
        return f"{entry['hub_id']}@{entry.get('revision', '')[:12]}"
    return str(entry.get("location", "?"))


def read_record(directory: Path, shard_metadata: dict[str, str] | None = None) -> Record | None:
    """The record a checkpoint carries: `vera_export.json`, else the one in its first shard's metadata.

    Raises:
        CheckpointError: A record that is not valid JSON or not a record's shape.
    """
    path = directory / RECORD_NAME
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CheckpointError(
                f"{path}: not a readable JSON file ({type(exc).__name__}); delete it or restore it"
            ) from None
        if isinstance(raw, dict) and raw.get("format") != FORMAT:
            return None  # an ONNX export's manifest, not a merge record
        return _parse(path, raw)
    text = (shard_metadata or {}).get(METADATA_KEY)
    if text is None:
        return None
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise CheckpointError(
            f"{directory}: the shard metadata's {METADATA_KEY!r} record is not JSON; re-save the checkpoint"
        ) from None
    return _parse(directory, raw)


def checkpoint_record(index: ShardedTensorIndex) -> Record | None:
    """`read_record` of a checkpoint: its `vera_export.json`, else its first shard's metadata."""
    return read_record(index.root, index.metadata(index.shards[0]) if index.shards else None)


def shown_record(index: ShardedTensorIndex, warnings: list[str]) -> Record | None:
    """`checkpoint_record` for commands that show a record rather than act on it (inspect, verify): a malformed
    one is a warning in `warnings`, not an error."""
    try:
        return checkpoint_record(index)
    except CheckpointError as exc:
        warnings.append(str(exc))
        return None


def _parse(where: Path, raw: Any) -> Record:
    def entry(value: Any) -> bool:
        return (
            isinstance(value, dict)
            and isinstance(value.get("location"), str)
            and all(isinstance(value.get(k, ""), str) for k in ("hub_id", "revision"))
            and isinstance(value.get("sha256", {}), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in value.get("sha256", {}).items())
        )

    if (
        not isinstance(raw, dict)
        or raw.get("format") != FORMAT
        or not entry(raw.get("base"))
        or not isinstance(raw.get("adapters"), list)
        or not all(entry(a) for a in raw["adapters"])
        or not isinstance(raw.get("version"), str)
    ):
        raise CheckpointError(
            f"{where}: malformed merge record (expected format {FORMAT!r} with base, adapters and version); "
            f"delete it or restore it"
        )
    return Record.from_json(raw)


def same_adapter(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two recorded adapters are the same files (their digests), wherever they were."""
    return bool(a.get("sha256")) and a.get("sha256") == b.get("sha256")


def next_record(
    base_dir: Path, carried: Record | None, adapters: list[dict[str, Any]], alpha: float, ignore: bool
) -> Record:
    """The record of a merge (`alpha` 1) or unmerge (-1) of `adapters` into a base carrying `carried`.

    Raises:
        IncompatibleAdapterError: Merging an adapter the base already holds, or unmerging one it does not list
            (unless `ignore`).
    """
    record = (
        Record(base=dict(carried.base), adapters=list(carried.adapters))
        if carried is not None
        else Record(base={"location": str(base_dir), **_hub_fields(base_dir)})
    )
    known = len(record.adapters)  # adapters before this command's
    merged_twice, unlisted = [], []
    for adapter in adapters:
        found = next((i for i, a in enumerate(record.adapters) if same_adapter(a, adapter)), None)
        if alpha > 0:
            if found is not None:
                merged_twice.append(
                    f"{adapter['location']}: "
                    + (
                        "given twice"
                        if found >= known
                        else f"{base_dir} records this adapter as merged in already"
                    )
                )
            record.adapters.append(adapter)
        elif found is not None:
            del record.adapters[found]
        elif carried is not None:
            unlisted.append(str(adapter["location"]))
    if merged_twice and not ignore:
        raise IncompatibleAdapterError(
            f"{'; '.join(merged_twice)} (the same files): merging it again folds it in twice - pass "
            f"--ignore-record if that is what you want"
        )
    if unlisted and not ignore:
        raise IncompatibleAdapterError(
            f"{', '.join(unlisted)}: {base_dir} does not record this adapter as merged in "
            f"({len(carried.adapters)} recorded); subtracting it would change the model - pass --ignore-record "
            f"to unmerge it anyway"
        )
    return record


def _hub_fields(directory: Path) -> dict[str, str]:
    origin = snapshot_origin(directory)
    return {} if origin is None else {"hub_id": origin[0], "revision": origin[1]}


class BaseDigests:
    """The base's files hashed while the merge writes: in a background thread at the lowest priority, so that it
    takes the CPU time the fold leaves and not the fold's, and by `join` at the caller's priority for whatever is
    left. Behind other processes' work the background thread may get next to no CPU at all: waiting for it, an
    8-layer merge beside two busy processes took 69 s instead of 11."""

    def __init__(self, directory: Path, shards: Iterable[Path]) -> None:
        """Start hashing `shards` (paths under `directory`) and `model_files(directory)`."""
        self.directory = directory
        self.result: dict[str, str] = {}
        self.error: BaseException | None = None
        # Not finished, in order; the first may be begun (`_begun`).
        self._left = sorted([str(Path(s).relative_to(directory)) for s in shards] + model_files(directory))
        self._begun: tuple[BinaryIO, Any] | None = None  # (its file, the digest so far)
        self._hurry = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vera-export-digests", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # Lowest priority (Linux: per thread).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            self._hash(until=self._hurry)
        except BaseException as exc:  # re-raised in the main thread by `join`
            self.error = exc
            self._close()

    def _hash(self, until: threading.Event | None = None) -> None:
        """Hash the files left, in order, going on with one begun; stop between chunks once `until` is set."""
        while self._left:
            name = self._left[0]
            if self._begun is None:
                known = _blob_digest(self.directory / name)
                if known is not None:
                    self.result[self._left.pop(0)] = known
                    continue
                self._begun = ((self.directory / name).open("rb"), hashlib.sha256())
            f, digest = self._begun
            while chunk := f.read(_CHUNK):
                digest.update(chunk)  # hashlib lets other threads run while it hashes a large chunk
                if until is not None and until.is_set():
                    return
            f.close()
            self._begun = None
            self.result[self._left.pop(0)] = digest.hexdigest()

    def join(self) -> dict[str, str]:
        """Every file's SHA-256, finishing here what the background thread has not."""
        self._hurry.set()
        self.thread.join()
        try:
            if self.error is None:
                self._hash()
        except OSError as exc:
            self.error = exc
        finally:
            self._close()
        if self.error is not None:
            raise CheckpointError(
                f"{self.directory}: could not be read while hashing it ({quoted(str(self.error))})"
            ) from None
        return self.result

    def __enter__(self) -> BaseDigests:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop hashing (when the merge failed: nothing joined): the background thread ends after its chunk."""
        self._hurry.set()
        self.thread.join()
        self._close()

    def _close(self) -> None:
        if self._begun is not None:
            self._begun[0].close()
            self._begun = None


def model_files(source: Path) -> list[str]:
    """The base's files besides its shards that say what the model is (hashed into the record)."""
    return [name for name in (INDEX_NAME, "config.json") if (source / name).is_file()]


def write_record(staging: Path, record: Record, source: Path) -> None:
    """`vera_export.json` and the model card (the base's card text kept below ours) into `staging`."""
    (staging / RECORD_NAME).write_text(json.dumps(record.to_json(), indent=2) + "\n", encoding="utf-8")
    base_card = None
    if (source / CARD_NAME).is_file():
        base_card = (source / CARD_NAME).read_text(encoding="utf-8", errors="replace")
    (staging / CARD_NAME).write_text(model_card(record, base_card), encoding="utf-8")


def model_card(record: Record, base_card: str | None) -> str:
    """The merged model's `README.md`: front matter the Hub reads, what was merged, then the base's card text."""
    lines = ["---"]
    if "hub_id" in record.base:
        lines.append(f"base_model: {record.base['hub_id']}")
        lines.append("base_model_relation: merge")
    lines += ["tags:", "- vera", "- peft", "- merged", "library_name: transformers", "---", ""]
    base = _name(record.base)
    adapters = "\n".join(f"- `{_name(a)}`" for a in record.adapters) or "- none"
    lines += [
        f"# {base} with VeRA adapters merged in",
        "",
        f"Merged by vera-export {record.version}: {PRECISION_RULE}. The adapters folded in, oldest first:",
        "",
        adapters,
        "",
        f"`{RECORD_NAME}` holds the full record, with the SHA-256 of every input file.",
    ]
    if base_card:
        lines += [
            "",
            "---",
            "",
            f"The base model's card ({base}):",
            "",
            _without_front_matter(base_card).strip(),
        ]
    return "\n".join(lines) + "\n"


def _without_front_matter(card: str) -> str:
    if card.startswith("---"):
        end = card.find("\n---", 3)
        if end != -1:
            return card[end + 4 :]
    return card
