"""`mtser extract`: read a corpus, run the encoders (Ray actors), write the feature store; print one summary line."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from mtser.cli.options import STORAGE_OPTIONS, parse_storage_options
from mtser.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)


def _notify(line: str) -> None:
    """An event line on stderr, above the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"extract: {line}", file=sys.stderr)


def extract(
    corpus: str = typer.Argument(..., help="MSP-Podcast folder, .csv/.jsonl manifest, or a folder of audio files; "
                                           "a local path or an fsspec URL (s3://bucket/MSP-Podcast)."),
    config: Path = typer.Option(..., "--config", help="Recipe YAML (its `extract` section is used)."),
    store: str = typer.Option(..., "--store", help="Feature store path or URL (s3://... with fsspec)."),
    workers: int = typer.Option(1, "--workers", min=0, help="Ray actors (one GPU each if any); 0 = in this process."),
    address: str = typer.Option(None, "--address", help="Join an existing Ray cluster (e.g. auto or HOST:PORT)."),
    augment: int = typer.Option(None, "--augment", min=0, help="Augmented copies per Train utterance (default: config)."),
    splits: list[str] = typer.Option(None, "--splits", help="Only these splits (repeat, or comma-separated)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    allow_outside_links: bool = typer.Option(False, "--allow-outside-links",
                                             help="Follow symlinks that lead out of the corpus folder (refused and "
                                                  "reported by default)."),
    storage_options: str = STORAGE_OPTIONS,
) -> None:
    """Extract encoder features for every utterance; rerunning the same command resumes (committed shards are kept).

    Exit code 0: all written; 1: some utterances failed (the rest are written; see the store's failures table);
    2: usage or config error.
    """
    from mtser.featurestore.corpus import read_corpus
    from mtser.featurestore.models import check_models
    from mtser.featurestore.extract import extract as run_extract
    from mtser.featurestore.extract_worker import reader_problems
    from mtser.featurestore.labels import SPLITS
    from mtser.trainer.config import load_config

    options = parse_storage_options(storage_options)
    wanted = [s.strip() for item in (splits or []) for s in item.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SPLITS))
    if unknown:
        raise UsageError(f"--splits: unknown split(s) {unknown}; expected some of {list(SPLITS)}")
    cfg = load_config(config).extract
    check_models(cfg.encoders, config.parent)
    read = read_corpus(corpus, options, allow_outside_links=allow_outside_links)
    failed, warned = reader_problems(read.problems, read.utterances)
    summary = run_extract(read.utterances, cfg, store, workers=workers, address=address, augment=augment,
                          splits=wanted or None, problems=failed, warnings=warned, storage_options=options,
                          progress=progress, notify=_notify)
    for utt_id, stage, reason in summary.warnings[:20]:
        typer.echo(f"extract: warning: {utt_id} [{stage}] {reason}", err=True)
    for utt_id, stage, reason in summary.failures[:20]:
        typer.echo(f"extract: failed: {utt_id} [{stage}] {reason}", err=True)
    if len(summary.failures) > 20:
        typer.echo(f"extract: ... {len(summary.failures) - 20} more in the store's failures table", err=True)
    for shard, problem in summary.damaged.items():
        typer.echo(f"extract: part {shard} was committed but damaged, redone: {problem}", err=True)
    for shard, error in summary.shards_failed.items():
        typer.echo(f"extract: shard {shard} failed after retries: {error}", err=True)
    typer.echo(f"extract: {summary.line()}")
    if not summary.ok:
        raise typer.Exit(1)
