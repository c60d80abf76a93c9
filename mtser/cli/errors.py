"""The one error type of the commands: a one-line message and its exit code, printed by `mtser.cli.main`.

Exit codes: 0 ok, 1 data problems (store, checkpoint, manifest, audio), 2 usage or config problems, 130 interrupted.
Anything else (a programming error) keeps its traceback."""
from __future__ import annotations

from typing import NoReturn

DATA = 1
USAGE = 2
INTERRUPTED = 130


class CliError(Exception):
    """A problem with the user's input, named in one line; `code` is the exit code (DATA or USAGE)."""

    def __init__(self, message: str, code: int = DATA):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = DATA) -> NoReturn:
    """Stop the command with `message` and exit code `code`."""
    raise CliError(message, code)
