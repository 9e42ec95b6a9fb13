"""Progress bars on stderr: silent when turned off, and a stage bar shows its first stage as soon as it starts."""

from __future__ import annotations

import io

import pytest

from vera_export.progress import progress_bar, stage_bar


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so click draws its bars instead of printing only the label."""

    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    """Make stderr a terminal for the rest of the test (in the test itself: pytest resets stderr after set-up)."""
    stderr = Terminal()
    monkeypatch.setattr("sys.stderr", stderr)
    return stderr


def test_disabled_bars_write_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    terminal = _terminal(monkeypatch)
    with progress_bar(100, "merging", enabled=False) as advance:
        advance(60)
        advance(40)
    with stage_bar(["loading", "tracing"], "exporting", enabled=False) as start:
        start("loading")
        start("tracing")
    assert terminal.getvalue() == "" and capsys.readouterr() == ("", "")


def test_the_progress_bar_counts_up_to_its_total(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _terminal(monkeypatch)
    with progress_bar(200, "merging") as advance:
        advance(50)
        assert "merging" in terminal.getvalue() and "25%" in terminal.getvalue()
        advance(150)
    assert "100%" in terminal.getvalue()


def test_the_stage_bar_shows_the_first_stage_at_once_and_then_each_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = _terminal(monkeypatch)
    with stage_bar(["loading", "tracing", "writing"], "exporting (adapter)") as start:
        start("loading")
        first = terminal.getvalue()
        start("tracing")
        second = terminal.getvalue()[len(first) :]
        start("writing")
    assert "exporting (adapter)" in first and "loading" in first and "0%" in first
    assert "tracing" in second and "33%" in second
    assert "100%  done" in terminal.getvalue()


def test_outside_a_terminal_only_the_label_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    """What a CI log gets: one line per bar, not a redrawn line per step."""
    with stage_bar(["loading", "tracing"], "exporting (merged)") as start:
        start("loading")
        start("tracing")
    assert capsys.readouterr().err == "exporting (merged)\n"
