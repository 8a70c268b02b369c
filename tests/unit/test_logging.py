"""The console log format has colours on a terminal only, and never with ``NO_COLOR``."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog

from iot_common.logging import configure_logging, get_logger, use_colours

ESC = "\x1b["


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def console_line(monkeypatch: pytest.MonkeyPatch, stderr: io.StringIO) -> str:
    monkeypatch.setattr(sys, "stderr", stderr)
    configure_logging("info", "console", service="test")
    get_logger("test.colours").warning("disk almost full", free_mb=12)
    return stderr.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_console_lines_into_a_pipe_or_file_have_no_colour_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    line = console_line(monkeypatch, io.StringIO())
    assert "disk almost full" in line
    assert "free_mb=12" in line
    assert ESC not in line


@pytest.mark.usefixtures("restore_logging")
def test_console_lines_on_a_terminal_are_coloured_unless_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    assert ESC in console_line(monkeypatch, Terminal())
    monkeypatch.setenv("NO_COLOR", "1")
    line = console_line(monkeypatch, Terminal())
    assert "disk almost full" in line
    assert ESC not in line


def test_colour_choice() -> None:
    pipe, terminal = io.StringIO(), Terminal()
    assert use_colours(terminal, {}) is True
    assert use_colours(pipe, {}) is False
    assert use_colours(terminal, {"NO_COLOR": "1"}) is False
    assert use_colours(terminal, {"NO_COLOR": ""}) is True  # set but empty: no effect (no-color.org)
    assert use_colours(pipe, {"FORCE_COLOR": "1"}) is True
    assert use_colours(terminal, {"NO_COLOR": "1", "FORCE_COLOR": "1"}) is False
    closed = io.StringIO()
    closed.close()
    assert use_colours(closed, {}) is False
