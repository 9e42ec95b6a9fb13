"""Hugging Face Hub IDs and the Hub cache: `org/name[@revision]` fetched (or found offline) as transformers does,
and a cache repository folder (`models--org--name`) read as its `refs/main` snapshot."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import VeraExportError

# org/name with the Hub's characters, and an optional @revision (a branch, a tag or a commit).
_HUB_ID = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,200})?"
)
_CACHE_PREFIX = "models--"


def is_hub_id(text: str) -> bool:
    """Whether `text` reads as a Hub ID (`org/name` or `org/name@revision`) rather than a path."""
    return _HUB_ID.fullmatch(text) is not None and ".." not in text.split("@")[0]


def snapshot_origin(directory: Path) -> tuple[str, str] | None:
    """`(org/name, commit)` when `directory` is a snapshot of the Hugging Face cache, else None."""
    snapshots, repo = directory.parent, directory.parent.parent
    if snapshots.name == "snapshots" and repo.name.startswith(_CACHE_PREFIX):
        return repo.name.removeprefix(_CACHE_PREFIX).replace("--", "/"), directory.name
    return None


def is_cache_repository(path: Path) -> bool:
    """Whether `path` is a repository folder of the Hub cache (`models--org--name`, with `snapshots/`)."""
    return path.name.startswith(_CACHE_PREFIX) and (path / "snapshots").is_dir()


def hub_snapshot(hub_id: str, patterns: list[str], error: type[VeraExportError]) -> Path:
    """The local snapshot of Hub repository `hub_id`, with the files matching `patterns`, fetched as
    transformers would.

    Honours `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` (and `TRANSFORMERS_OFFLINE`) as they are when called, and
    the token `huggingface_hub` finds (`HF_TOKEN` or `hf auth login`). Offline, only the cache is looked at.

    Raises:
        error: Not cached when offline, not found, not reachable, or refused.
    """
    repo_id, _, revision = hub_id.partition("@")
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE)
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise error(f"{hub_id}: Hub IDs need huggingface_hub: pip install huggingface_hub") from None
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision or None,
            cache_dir=_hub_cache(),
            allow_patterns=patterns,
            local_files_only=offline,
            library_name="vera-export",
        )
    except hub_errors.LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise error(
            f"{hub_id}: no such directory, and not in the Hugging Face cache ({_hub_cache()}) as {how}; fetch it with "
            f"`hf download {repo_id}` where the Hub is reachable, or pass a local directory"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise error(
            f"{hub_id}: no such directory, and the Hub repository has no revision {revision!r}"
        ) from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError):
        raise error(
            f"{hub_id}: no such directory, and no such Hub repository, or it needs a token with access (set "
            f"HF_TOKEN or run `hf auth login`)"
        ) from None
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise error(
            f"{hub_id}: could not be fetched from the Hub ({type(exc).__name__}); try again"
        ) from None
    return Path(folder)


_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def cache_snapshot(repo: Path, error: type[VeraExportError]) -> Path:
    """The snapshot a cache repository folder's `refs/main` points at."""
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        raise error(
            f"{repo}: a Hugging Face cache folder without refs/main; pass one of its snapshots/<commit> "
            f"directories"
        ) from None
    snapshot = repo / "snapshots" / commit
    if not commit or "/" in commit or not snapshot.is_dir():
        raise error(f"{repo}: refs/main names no snapshot in snapshots/; pass a snapshots/<commit> directory")
    return snapshot
