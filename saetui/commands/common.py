"""What the command handlers share: messages on stderr, the index check, the terminal test."""

from __future__ import annotations

import sys
from pathlib import Path


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_index(path: Path) -> None:
    """A missing path or a directory that is no saetui index: one sentence, exit 2."""
    from saetui.index.format import read_marker

    read_marker(path)


def has_terminal() -> bool:
    """Whether the TUI can run: it reads keys from stdin and draws on stderr."""
    return sys.stdin.isatty() and sys.stderr.isatty()
