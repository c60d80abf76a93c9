"""Options several command groups share."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from mtser.errors import UsageError

STORAGE_OPTIONS = typer.Option(None, "--storage-options",
                               help="fsspec options of the command's URLs (store, corpus, run folder, checkpoints, "
                                    'external members) as JSON, e.g. \'{"endpoint_url": "..."}\'.')


def parse_storage_options(text: str | None) -> dict | None:
    """The --storage-options JSON as a dict; a usage error (exit 2) naming the problem otherwise."""
    try:
        options = json.loads(text) if text else None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--storage-options is not valid JSON: {exc}") from None
    if options is not None and not isinstance(options, dict):
        raise UsageError("--storage-options must be a JSON object")
    return options


def check_output_file(path: Path | None, option: str) -> None:
    """Before any work: `path` (an output file) must not be a folder and its folder must exist (exit 2 otherwise)."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    if not path.absolute().parent.is_dir():
        raise UsageError(f"{option} {path}: folder {path.absolute().parent} does not exist")
