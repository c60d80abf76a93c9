"""The errors that reach the user: each carries its exit code, and `mtser.cli.main` prints it as one line.

Exit codes: 0 ok, 1 data problems (store, checkpoint, manifest, audio, run folder), 2 usage or config problems,
130 interrupted. Any other exception is a programming error and keeps its traceback. Importing this module needs
nothing beyond Python, so the feature store, the trainer and the CLI all raise these types."""
from __future__ import annotations

DATA = 1
USAGE = 2
INTERRUPTED = 130


class MtserError(Exception):
    """A problem with the user's input or data, named in one line; `exit_code` is DATA unless the class or the
    raiser says otherwise."""

    exit_code: int = DATA

    def __init__(self, message: str = "", exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(MtserError):
    """A wrong invocation, argument or config (exit code 2)."""

    exit_code = USAGE


class DataError(MtserError, ValueError):
    """Input data that cannot be used as it is (audio, a split, labels, a damaged array): exit code 1."""
