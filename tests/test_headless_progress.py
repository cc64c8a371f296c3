"""The headless progress line on a terminal: one line that fits the terminal's width (at
80 columns over ssh a wrapped line left a copy of itself per update)."""

from __future__ import annotations

import io

import pytest

from saetui.collect.headless import MIN_BAR_WIDTH, ProgressPrinter
from saetui.collect.job import CollectProgress


@pytest.mark.parametrize("columns", [40, 80, 120])
def test_the_tty_line_fits_the_terminal(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    stream = io.StringIO()
    printer = ProgressPrinter(stream, is_tty=True)
    update = CollectProgress("collecting", 16_015, 78_036, 928.0, 66.0)
    printer(update)
    line = stream.getvalue().removeprefix("\r\x1b[2K")
    assert 0 < len(line) <= columns - 1
    assert line.startswith("collecting  [")
    if columns >= 120:  # room for everything: the full bar and the ETA
        assert "[" + "#" * 5 + "." * 23 + "]" in line and line.endswith("ETA 1:06")
    elif columns == 80:  # a narrower bar keeps the figures whole
        assert "16,015/78,036 tokens (21%)" in line and "928 tok/s" in line
        bar = line[line.index("[") + 1 : line.index("]")]
        assert MIN_BAR_WIDTH <= len(bar) < printer.width


def test_log_lines_are_whole_when_not_a_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    stream = io.StringIO()
    ProgressPrinter(stream, is_tty=False)(CollectProgress("collecting", 10, 20, 5.0, 2.0))
    assert stream.getvalue() == "collecting  10/20 tokens (50%)  5 tok/s  ETA 0:02\n"
