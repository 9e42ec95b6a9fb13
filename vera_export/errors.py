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


class SetupError(VeraExportError, ValueError):
    """This machine or installation cannot do what was asked: a device it lacks, an optional extra not installed."""


class VeraExportWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""


# An error line is at most this long: a value from a hostile file must not flood a terminal or a CI log.
MAX_LINE = 2000
# A value quoted in a message (a config field, a tensor name from a header) is cut to this many characters.
MAX_QUOTED = 120


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 adapter`, `2 adapters`."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


def listing(items: list[str], limit: int = 10) -> str:
    """`a, b, c and 7 more`: a bounded list of names (or short sentences) for a message, each item cut too."""
    shown = ", ".join(quoted(item, 2 * MAX_QUOTED, repr_=False) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def quoted(value: object, limit: int = MAX_QUOTED, repr_: bool = True) -> str:
    """`value` as a message quotes it (its repr, or `str` with `repr_=False`), cut to about `limit` characters."""
    text = repr(value) if repr_ else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """`text` as one bounded line: line breaks and other control characters escaped, cut to `limit` characters."""
    escaped = text.strip().translate(_ESCAPES)
    if len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}... ({len(escaped) - limit} more characters)"


_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)]} | {10: "\\n", 13: "\\r", 9: "\\t"}
