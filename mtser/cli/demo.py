"""(placeholder: commands are added by the issue that builds them)"""
import typer


def register(app: typer.Typer) -> None:
    pass
