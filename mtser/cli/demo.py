"""`mtser demo-corpus` and `mtser make-test-encoders`: the demo's synthetic corpus and small local encoders."""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("demo-corpus")(demo_corpus)
    app.command("make-test-encoders")(make_test_encoders)
    app.command("demo-recording")(demo_recording)


def demo_corpus(
    out: Path = typer.Argument(..., help="Folder to create (MSP-Podcast layout: Audios/, Transcripts/, Labels/)."),
    size: int = typer.Option(400, "--size", min=10, help="Number of utterances (about 10 % are audio-only Test3)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, byte-identical corpus."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it already exists."),
) -> None:
    """Synthesise a small MSP-Podcast-style corpus with espeak-ng (emotion in wording and prosody)."""
    from mtser.demo import make_demo_corpus

    make_demo_corpus(out, size, seed, overwrite=overwrite)
    typer.echo(f"demo-corpus: wrote {size} utterances to {out}")


def make_test_encoders(
    out: Path = typer.Argument(..., help="Folder for wavlm/, whisper/ and roberta/."),
    seed: int = typer.Option(0, "--seed", help="torch seed of the random initialisation."),
    layers: int = typer.Option(2, "--layers", min=1, help="transformer layers per encoder (hidden states: layers + 1; "
                               "configs/demo-layers.yaml uses 3)."),
) -> None:
    """Save small randomly initialised WavLM, Whisper and RoBERTa models (loadable with from_pretrained)."""
    from mtser.demo_encoders import make_test_encoders as build

    paths = build(out, seed=seed, layers=layers)
    for name, path in paths.items():
        typer.echo(f"make-test-encoders: {name} -> {path}")


def demo_recording(
    corpus: Path = typer.Argument(..., help="A demo corpus (mtser demo-corpus)."),
    out: Path = typer.Argument(..., help="The WAV file to write."),
    utterances: int = typer.Option(60, "--utterances", min=1, help="Utterances in the recording (cycled)."),
    minutes: float = typer.Option(0.0, "--minutes", min=0.0, help="Cycle utterances until this long."),
    snr_db: float = typer.Option(20.0, "--snr-db", help="White background noise at this SNR."),
    seed: int = typer.Option(0, "--seed", help="Pauses and noise."),
) -> None:
    """A long recording made of demo utterances with pauses of 0.2-2 s (for `mtser predict --timeline`); the truth
    (utterance, start_s, end_s, EmoClass) is written next to it as OUT.csv."""
    from mtser.demo import make_long_recording

    truth = make_long_recording(corpus, out, utterances, snr_db=snr_db, repeat_to_s=minutes * 60, seed=seed)
    truth.to_csv(out.with_suffix(".csv"), index=False)
    typer.echo(f"demo-recording: {len(truth)} utterances, {truth['end_s'].max():.0f} s -> {out}")
