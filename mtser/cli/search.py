"""`mtser tune`, `mtser ensemble`, `mtser predict`, `mtser report`: thin wrappers over mtser.trainer.{tune,ensemble,
predict,report}."""
from __future__ import annotations

from pathlib import Path

import typer

from mtser.cli.options import STORAGE_OPTIONS, parse_storage_options


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def tune(
    search: Path = typer.Option(..., "--search", help="Search space YAML (configs/grid.yaml)."),
    store: str = typer.Option(..., "--store", help="Feature store URL or path."),
    out: str = typer.Option(..., "--out", help="Run folder, a path or URL (trials, checkpoints, Ray logs, results.csv)."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted search: run only unfinished trials."),
    stage: list[int] = typer.Option([1, 2], "--stage", help="Stages to run (repeat the option); default both."),
    storage_options: str = STORAGE_OPTIONS,
) -> None:
    """Ray Tune search: stage 1 α × β × pooling (multi-task), stage 2 fine-tuning from the best stage-1 trials.

    OUT may be a URL (s3://bucket/run): trials on every node write there. A remote store is copied once per node into
    the node's cache ($MTSER_CACHE_DIR, default ~/.cache/mtser); the trials there read that copy."""
    import pandas as pd

    from mtser.config import ConfigError
    from mtser.trainer.runs import RunFolder
    from mtser.trainer.tune import SearchError, run_search

    options = parse_storage_options(storage_options)
    try:
        summary = run_search(search, store, out, resume=resume, stages=tuple(stage), storage_options=options,
                             notify=lambda line: typer.echo(f"tune: {line}", err=True))
    except ConfigError as exc:
        _fail(str(exc), 2)
    except SearchError as exc:
        _fail(str(exc), 2 if exc.usage else 1)
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_rows", None):
        shown = summary.table.drop(columns=["checkpoint"]).dropna(axis=1, how="all")
        typer.echo(shown.to_string(index=False, float_format="%.4f", na_rep=""))
    run = RunFolder(out, options)
    typer.echo(f"results: {run.url_of('results.csv')}   Ray Tune logs (TensorBoard): {run.url_of('ray')}")
    if summary.failed:
        _fail(f"{len(summary.failed)} trial(s) failed: {', '.join(summary.failed)} (see state.json in their folders)")


def ensemble(
    run: str = typer.Option(..., "--run", help="Run folder of `mtser tune` (path or URL)."),
    store: str = typer.Option(..., "--store", help="Feature store URL or path."),
    split: str = typer.Option("Development", "--split", help="Split to predict (Development, Test1-3)."),
    top_k: int = typer.Option(0, "--top-k", help="Members per task and attribute (0: the recipe's ensemble section)."),
    out: str = typer.Option(None, "--out", help="Output folder, path or URL (default RUN/ensemble)."),
    extra_member: list[str] = typer.Option([], "--extra-member", help="ATTRIBUTES=FILE: a challenge-format attribute "
                                           "CSV as a member, e.g. arousal,dominance=baseline.csv (repeatable)."),
    storage_options: str = STORAGE_OPTIONS,
) -> None:
    """The paper's ensembles: the best Task-1 fine-tuning(s) for classes; per attribute the best Task-2 fine-tunings
    plus the recipe's forced members and any --extra-member files. Prints metrics (ours and challenge-comparable),
    writes challenge CSVs and a manifest."""
    from mtser.featurestore.labels import SPLITS
    from mtser.featurestore.store import StoreError
    from mtser.trainer.checkpoint import CheckpointError
    from mtser.config import ConfigError
    from mtser.trainer.ensemble import EnsembleError, build_ensemble, metrics_table, parse_extra_members
    from mtser.trainer.runs import RunError

    if split not in SPLITS:
        _fail(f"--split: expected one of {list(SPLITS)}, got {split!r}", 2)
    try:
        manifest = build_ensemble(run, store, split=split, k=top_k or None, out_dir=out,
                                  external=parse_extra_members(extra_member),
                                  storage_options=parse_storage_options(storage_options))
    except EnsembleError as exc:
        _fail(str(exc), 2 if exc.usage else 1)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except (RunError, StoreError, CheckpointError) as exc:
        _fail(str(exc))
    table = metrics_table(manifest, split)
    if table[split].notna().any():
        typer.echo(table.to_string(index=False, float_format="%.4f"))
    else:
        typer.echo(f"{split} has no labels: predictions only")
    for name, path in manifest["files"][split].items():
        typer.echo(f"{name}: {path}")


def predict(
    inputs: list[Path] = typer.Argument(..., help="Audio files and/or directories of audio."),
    ensemble: str = typer.Option(..., "--ensemble",
                                 help="Ensemble manifest (RUN/ensemble/ensemble.json) or its folder; a path or URL."),
    out: Path = typer.Option(None, "--out", help="Write the table as CSV here instead of printing it."),
    transcripts: Path = typer.Option(None, "--transcripts", help="Folder of <audio stem>.txt transcripts (else ASR)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    skip_external: bool = typer.Option(False, "--skip-external", help="Drop the ensemble's external members "
                                       "(prediction files, which cannot score new audio) instead of refusing."),
    storage_options: str = STORAGE_OPTIONS,
) -> None:
    """Run the encoders and the ensemble on audio: class, 8 class probabilities, arousal, valence, dominance."""
    from mtser.trainer.checkpoint import CheckpointError
    from mtser.trainer.ensemble import EnsembleError
    from mtser.trainer.predict import predict_files

    try:
        run = predict_files(inputs, ensemble, device=device, transcripts=transcripts, skip_external=skip_external,
                            storage_options=parse_storage_options(storage_options))
    except EnsembleError as exc:
        _fail(str(exc), 2)
    except CheckpointError as exc:
        _fail(f"ensemble member: {exc}")
    if out:
        run.table.to_csv(out, index=False, float_format="%.6f")
        typer.echo(f"wrote {len(run.table)} rows to {out}")
    else:
        typer.echo(run.table.to_string(index=False, float_format="%.4f"))
    for name, reason in run.failures.items():
        typer.echo(f"skipped {name}: {reason}", err=True)
    if run.failures:
        raise typer.Exit(1)


def report(
    run: str = typer.Argument(..., help="Run folder of `mtser tune` (path or URL)."),
    out: str = typer.Option(None, "--out", help="Output folder, path or URL (default RUN/report)."),
    storage_options: str = STORAGE_OPTIONS,
) -> None:
    """PNG figures and one self-contained HTML page for a search run."""
    from mtser.trainer.report import ensemble_summary, write_report
    from mtser.trainer.runs import RunError

    options = parse_storage_options(storage_options)
    try:
        page = write_report(run, out, options)
    except RunError as exc:
        _fail(str(exc))
    summary = ensemble_summary(run, options)
    if summary is not None:
        typer.echo("ensemble metrics:")
        typer.echo(summary.dropna(how="all").to_string(float_format="%.4f"))
    typer.echo(f"report: {page}")


def register(app: typer.Typer) -> None:
    for command in (tune, ensemble, predict, report):
        app.command()(command)
