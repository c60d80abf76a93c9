"""`mtser features ls|show|export|verify`: inspect, export and check a feature store."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mtser.cli.options import STORAGE_OPTIONS, parse_storage_options
from mtser.errors import MtserError

features_app = typer.Typer(help="Inspect, export and verify a feature store.", no_args_is_help=True)

def register(app: typer.Typer) -> None:
    app.add_typer(features_app, name="features")


def _open(store: str, storage_options: str | None):
    from mtser.featurestore.store import open_store

    return open_store(store, storage_options=parse_storage_options(storage_options))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return ""


@features_app.command("ls")
def ls(store: str = typer.Argument(..., help="Store path or URL."), storage_options: Optional[str] = STORAGE_OPTIONS,
       as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")) -> None:
    """Encoders, utterance counts per split and bytes."""
    summary = _open(store, storage_options).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{summary['url']}: schema {summary['schema_version']}, {summary['parts']} committed parts, "
               f"{summary['utterances']} utterances, {summary['failures']} failures, {summary['warnings']} warnings")
    typer.echo("  splits: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["per_split"].items())))
    for name, enc in summary["encoders"].items():
        splits = ", ".join(f"{k} {v}" for k, v in sorted(enc["per_split"].items()))
        layers = "" if enc["layers"] is None else f" × layers {enc['layers']}"
        typer.echo(f"  {name}: {enc['kind']} {enc['model']}, {enc['dim']}-d{layers} {enc['dtype']} "
                   f"({enc['compression']}), {enc['utterances']} utterances ({splits}), {enc['frames']} frames, "
                   f"{_size(enc['stored_bytes'])}")


@features_app.command("show")
def show(store: str = typer.Argument(..., help="Store path or URL."), utt_id: str = typer.Argument(..., help="Utterance id."),
         encoder: Optional[str] = typer.Option(None, "--encoder", "-e", help="Only this encoder."),
         storage_options: Optional[str] = STORAGE_OPTIONS) -> None:
    """One utterance: labels, transcript, and per encoder the frames' shape and statistics."""
    import numpy as np

    from mtser.featurestore.store import StoreError

    fs = _open(store, storage_options)
    table = fs.utterances
    if utt_id not in table.index:
        raise StoreError(f"{store}: no utterance {utt_id!r} in the store")
    typer.echo(utt_id)
    for column, value in table.loc[utt_id].items():
        typer.echo(f"  {column}: {value}")
    names = [encoder] if encoder else [n for n in sorted(fs.encoders) if fs.has(utt_id, n)]
    for name in names:
        x = fs.get(utt_id, name, dtype=np.float32)
        layers = fs.encoders[name].layers
        typer.echo(f"  [{name}] shape {x.shape}{'' if layers is None else f' (T, L, D), layers {list(layers)}'} "
                   f"{fs.encoders[name].dtype}: mean {x.mean():.4f} std {x.std():.4f} min {x.min():.4f} "
                   f"max {x.max():.4f}")


@features_app.command("export")
def export(store: str = typer.Argument(..., help="Store path or URL."),
           encoder: str = typer.Option(..., "--encoder", "-e", help="Encoder to export."),
           out: Path = typer.Option(..., "--out", help="A .npz file, or a directory for one .npy per utterance."),
           ids: Optional[list[str]] = typer.Option(None, "--ids", help="Utterance ids (repeatable; default: all)."),
           split: Optional[str] = typer.Option(None, "--split", help="Only utterances of this split."),
           storage_options: Optional[str] = STORAGE_OPTIONS) -> None:
    """Write one encoder's frames as .npz or as OUT/<name>.npy files; names are ids escaped into safe file names,
    listed with their ids in index.json (docs/store-format.md, "Exporting")."""
    from mtser.featurestore.export import export_dir, export_npz

    fs = _open(store, storage_options)
    chosen = list(ids) if ids else fs.ids(split=split, encoder=encoder)
    arrays = dict(zip(chosen, fs.get_many(chosen, encoder)))
    try:
        (export_npz if out.suffix == ".npz" else export_dir)(out, encoder, arrays)
    except OSError as exc:
        raise MtserError(f"cannot export to {out}: {exc.strerror or exc}") from None
    typer.echo(f"exported {len(arrays)} utterances of {encoder!r} to {out}")


@features_app.command("verify")
def verify(store: str = typer.Argument(..., help="Store path or URL."), storage_options: Optional[str] = STORAGE_OPTIONS) -> None:
    """Check index consistency and every utterance's checksum; exit code 1 when anything is wrong."""
    from mtser.featurestore.verify import verify_store

    report = verify_store(store, parse_storage_options(storage_options))
    for problem in report.problems:
        typer.echo(f"CORRUPT {problem}")
    typer.echo(f"{'ok' if report.ok else 'FAILED'}: {report.parts} parts, {report.utterances} utterance frame blocks, "
               f"{_size(report.bytes)} checked, {len(report.problems)} problems")
    raise typer.Exit(0 if report.ok else 1)
