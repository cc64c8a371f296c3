"""saetui's errors, by who can act on them.

- :class:`SaetuiInputError` — the user's input or environment (a path, a file's
  contents, an option, a full disk): one sentence that names the input, says what was
  expected and what to do; the CLI prints it and exits with code 2.
- :class:`IndexDamagedError` — an index whose files are damaged: which shard, and what to
  do (re-collect or restore); exit code 2 as well.
- :class:`IndexMissingError` / :class:`IndexEmptyError` — no index at a path, or one
  whose collector has not committed yet (the TUI waits for those instead of failing).
- Anything else is an internal error (a bug, or API misuse such as arrays of the wrong
  shape): the CLI prints one line pointing at the saved traceback and exits with 1.
"""

from __future__ import annotations


class SaetuiInputError(Exception):
    """Bad input from the user (path, file contents, option) or their environment."""

    exit_code = 2


class IndexMissingError(SaetuiInputError):
    """The path holds no saetui index (missing, or no marker file)."""


class IndexEmptyError(SaetuiInputError):
    """The index exists but its collector has not committed any data yet."""


class IndexDamagedError(SaetuiInputError):
    """An index file is damaged: the sentence names the shard and what to do."""
