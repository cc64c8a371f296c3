"""Errors a user can cause: one clear sentence, exit code 2, never a traceback."""

from __future__ import annotations


class SaetuiInputError(Exception):
    """Bad input from the user (path, file contents, option).

    The message is one sentence that names the input, says what was expected
    and what to do. The CLI prints it and exits with code 2.
    """

    exit_code = 2
