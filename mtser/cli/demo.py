"""`mtser demo-corpus` and `mtser make-test-encoders`: the demo's synthetic corpus and small local encoders."""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("demo-corpus")(demo_corpus)
    app.command("make-test-encoders")(make_test_encoders)


def demo_corpus(
    out: Path = typer.Argument(..., help="Folder to create (MSP-Podcast layout: Audios/, Transcripts/, Labels/)."),
    size: int = typer.Option(400, "--size", min=10, help="Number of utterances (about 10 % are audio-only Test3)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, byte-identical corpus."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it already exists."),
) -> None:
    """Synthesise a small MSP-Podcast-style corpus with espeak-ng (emotion in wording and prosody)."""
    from mtser.demo import make_demo_corpus

    try:
        make_demo_corpus(out, size, seed, overwrite=overwrite)
    except (FileExistsError, RuntimeError, OSError) as exc:
        typer.echo(f"demo-corpus: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"demo-corpus: wrote {size} utterances to {out}")


def make_test_encoders(
    out: Path = typer.Argument(..., help="Folder for wavlm/, whisper/ and roberta/."),
    seed: int = typer.Option(0, "--seed", help="torch seed of the random initialisation."),
) -> None:
    """Save small randomly initialised WavLM, Whisper and RoBERTa models (loadable with from_pretrained)."""
    from mtser.demo import make_test_encoders as build

    try:
        paths = build(out, seed=seed)
    except OSError as exc:
        typer.echo(f"make-test-encoders: {exc}", err=True)
        raise typer.Exit(1) from None
    for name, path in paths.items():
        typer.echo(f"make-test-encoders: {name} -> {path}")
