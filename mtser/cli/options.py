"""Options several command groups share."""
from __future__ import annotations

import json

import typer

STORAGE_OPTIONS = typer.Option(None, "--storage-options",
                               help="fsspec options of the command's URLs (store, corpus, run folder, checkpoints, "
                                    'external members) as JSON, e.g. \'{"endpoint_url": "..."}\'.')


def parse_storage_options(text: str | None) -> dict | None:
    """The --storage-options JSON as a dict; a usage error (exit 2) naming the problem otherwise."""
    try:
        options = json.loads(text) if text else None
    except json.JSONDecodeError as exc:
        typer.echo(f"error: --storage-options is not valid JSON: {exc}", err=True)
        raise typer.Exit(2)
    if options is not None and not isinstance(options, dict):
        typer.echo("error: --storage-options must be a JSON object", err=True)
        raise typer.Exit(2)
    return options
