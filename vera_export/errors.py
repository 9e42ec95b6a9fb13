"""Typed errors for every input the tool rejects, and the helpers their messages share.

Each message names the file or tensor, says what was found versus expected and what to do. The CLI prints the
message as one line and exits with code 2; anything else that escapes is a bug and keeps its traceback.
"""


class VeraExportError(Exception):
    """Base class of every expected error."""


class CheckpointError(VeraExportError, ValueError):
    """A base or merged model directory, or a safetensors file, is missing, malformed or inconsistent."""


class AdapterError(VeraExportError, ValueError):
    """An adapter directory is missing, is not a VeRA adapter, or has a malformed config or tensors."""


class IncompatibleAdapterError(VeraExportError, ValueError):
    """An adapter does not fit the base model (missing modules, wrong shapes, projections too small)."""


class OutputError(VeraExportError, ValueError):
    """The requested output location cannot be used safely."""


class VeraExportWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""


def listing(items: list[str], limit: int = 10) -> str:
    """`a, b, c and 7 more`: a bounded list of names for a message."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
