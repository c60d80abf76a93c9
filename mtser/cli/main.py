"""The `mtser` console script: one typer app; each command group lives in its own module with `register(app)`."""
from __future__ import annotations

import importlib

import typer

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


# Each module registers its commands; order here is the order `mtser --help` lists them in.
COMMAND_MODULES = ("demo", "extract", "features", "train", "search")
for _name in COMMAND_MODULES:
    importlib.import_module(f"mtser.cli.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
