"""The `mtser` console script: one typer app; each command group lives in its own module with `register(app)`."""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import typer

from mtser.errors import DATA, INTERRUPTED, MtserError

app = typer.Typer(
    name="mtser",
    help="Multi-task speech emotion recognition: a distributed feature store plus a lightweight trainer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from mtser import __version__

        typer.echo(f"mtser {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")) -> None:
    """Multi-task speech emotion recognition: a distributed feature store plus a lightweight trainer."""


# What an interrupted command keeps, added to its "interrupted" line.
INTERRUPTED_NOTES = {"extract": "committed shards are kept: rerun the same command to resume"}


def _guarded(name: str, command: Callable) -> Callable:
    """`command` with the one place that turns errors into exit codes: an `MtserError` (the library's and the
    commands' own) is printed as one line with its `exit_code`, an `OSError` (a file or the network refused) as one
    line with exit code 1, Ctrl-C as one line with exit code 130. Any other exception is a programming error: it
    propagates with its traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MtserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(DATA) from None
        except KeyboardInterrupt:
            note = INTERRUPTED_NOTES.get(name)
            typer.echo(f"{name}: interrupted" + (f"; {note}" if note else ""), err=True)
            raise typer.Exit(INTERRUPTED) from None
    return run


def _guard(group: typer.Typer, prefix: str = "") -> None:
    for info in group.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        info.callback = _guarded(f"{prefix}{name}", info.callback)
    for sub in group.registered_groups:
        _guard(sub.typer_instance, f"{prefix}{sub.name} ")


# Each module registers its commands; order here is the order `mtser --help` lists them in.
COMMAND_MODULES = ("demo", "extract", "features", "train", "search")
for _name in COMMAND_MODULES:
    importlib.import_module(f"mtser.cli.{_name}").register(app)
_guard(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
