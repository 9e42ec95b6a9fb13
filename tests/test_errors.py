"""The typed errors: every expected error is a VeraExportError and a ValueError, exported by the package, and
`listing` bounds the names a message lists."""

from __future__ import annotations

import pytest

import vera_export
from vera_export import errors
from vera_export.errors import VeraExportError, VeraExportWarning, counted, listing

ERRORS = [
    cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, VeraExportError) and cls is not VeraExportError
]


def test_the_module_defines_the_five_kinds_of_error() -> None:
    assert sorted(cls.__name__ for cls in ERRORS) == [
        "AdapterError",
        "CheckpointError",
        "IncompatibleAdapterError",
        "OutputError",
        "SetupError",
    ]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_is_a_vera_export_error_and_a_value_error(cls: type) -> None:
    assert issubclass(cls, VeraExportError) and issubclass(cls, ValueError)
    with pytest.raises(ValueError, match="names the file"):
        raise cls("names the file")
    assert getattr(vera_export, cls.__name__) is cls and cls.__name__ in vera_export.__all__


def test_the_warning_is_a_user_warning_and_not_an_error() -> None:
    assert issubclass(VeraExportWarning, UserWarning) and not issubclass(VeraExportWarning, VeraExportError)
    assert vera_export.VeraExportWarning is VeraExportWarning


@pytest.mark.parametrize(
    ("items", "limit", "expected"),
    [
        ([], 10, ""),
        (["a"], 10, "a"),
        (["a", "b", "c"], 3, "a, b, c"),
        (["a", "b", "c", "d"], 3, "a, b, c and 1 more"),
        ([str(i) for i in range(25)], 10, "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 15 more"),
    ],
)
def test_listing_is_bounded(items: list[str], limit: int, expected: str) -> None:
    assert listing(items, limit) == expected


@pytest.mark.parametrize(
    ("n", "noun", "plural", "expected"),
    [
        (0, "adapter", None, "0 adapters"),
        (1, "adapter", None, "1 adapter"),
        (2, "adapter", None, "2 adapters"),
        (1, "overridable tensor", None, "1 overridable tensor"),
        (3, "matrix", "matrices", "3 matrices"),
        (1, "matrix", "matrices", "1 matrix"),
    ],
)
def test_counted(n: int, noun: str, plural: str | None, expected: str) -> None:
    assert counted(n, noun, plural) == expected
