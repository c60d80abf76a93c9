"""`mtser tune`, `mtser ensemble`, `mtser predict`, `mtser report`: thin wrappers over mtser.trainer.{tune,ensemble,
predict,report}."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from mtser.cli.options import STORAGE_OPTIONS, check_output_file, parse_storage_options
from mtser.errors import MtserError, UsageError


def tune(
    search: Path = typer.Option(..., "--search", help="Search space YAML (configs/grid.yaml)."),
    store: str = typer.Option(..., "--store", help="Feature store URL or path."),
    out: str = typer.Option(..., "--out", help="Run folder, a path or URL (trials, checkpoints, Ray logs, results.csv)."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted search: run only unfinished trials."),
    stage: list[int] = typer.Option([1, 2], "--stage", help="Stages to run (repeat the option); default both."),
    yes: bool = typer.Option(False, "--yes", help="Run a search whose plan is large (more than 200 grid points, or "
                             "estimated memory or time beyond this machine) without asking."),
    storage_options: str = STORAGE_OPTIONS,
) -> None:
    """Ray Tune search: stage 1 α × β × pooling (multi-task), stage 2 fine-tuning from the best stage-1 trials.

    OUT may be a URL (s3://bucket/run): trials on every node write there. A remote store is copied once per node into
    the node's cache ($MTSER_CACHE_DIR, else $XDG_CACHE_HOME/mtser, else ~/.cache/mtser); the trials there read that copy."""
    import pandas as pd

    from mtser.trainer.runs import RunFolder
    from mtser.trainer.tune import run_search

    options = parse_storage_options(storage_options)

    def approve(plan) -> bool:
        """A large plan is printed; it runs with --yes, or when an interactive user confirms it."""
        typer.echo(f"{plan.text()}\n  needs approval: {'; '.join(plan.problems())}", err=True)
        return yes or (sys.stdin.isatty() and typer.confirm("run this search?", err=True))

    summary = run_search(search, store, out, resume=resume, stages=tuple(stage), storage_options=options,
                         approve=approve, notify=lambda line: typer.echo(f"tune: {line}", err=True))
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_rows", None):
        shown = summary.table.drop(columns=["checkpoint"]).dropna(axis=1, how="all")
        typer.echo(shown.to_string(index=False, float_format="%.4f", na_rep=""))
    run = RunFolder(out, options)
    typer.echo(f"results: {run.url_of('results.csv')}   Ray Tune logs (TensorBoard): {run.url_of('ray')}")
    if summary.failed:
        raise MtserError(f"{len(summary.failed)} trial(s) failed: {', '.join(summary.failed)} (see state.json in "
                         "their folders)")


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
    from mtser.configio import ConfigError
    from mtser.featurestore.labels import SPLITS
    from mtser.trainer.ensemble import (build_ensemble, coverage_line, metrics_table, missing_external_lines,
                                        parse_extra_members)

    if split not in SPLITS:
        raise UsageError(f"--split: expected one of {list(SPLITS)}, got {split!r}")
    manifest = build_ensemble(run, store, split=split, k=top_k or None, out_dir=out,
                              external=parse_extra_members(extra_member),
                              storage_options=parse_storage_options(storage_options))
    for line in [*missing_external_lines(manifest["missing_external"]),
                 *filter(None, [coverage_line(split, manifest["coverage"][split])])]:
        typer.echo(line)
    table = metrics_table(manifest, split)
    if table[split].notna().any():
        typer.echo(table.to_string(index=False, float_format="%.4f"))
    else:
        typer.echo(f"{split} has no labels: predictions only")
    for name, path in manifest["files"][split].items():
        typer.echo(f"{name}: {path}")


def predict(
    inputs: list[str] = typer.Argument(..., help="Audio files and/or folders of audio (paths or fsspec URLs)."),
    ensemble: str = typer.Option(..., "--ensemble",
                                 help="Ensemble manifest (RUN/ensemble/ensemble.json) or its folder; a path or URL."),
    out: str = typer.Option(None, "--out", help="Write the table as CSV here instead of printing it; with --timeline "
                            "the output folder (path or URL; required)."),
    transcripts: Path = typer.Option(None, "--transcripts", help="Folder of <audio stem>.txt transcripts (else ASR)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (--workers: each actor uses its GPU where it "
                                "has one)."),
    skip_external: bool = typer.Option(False, "--skip-external", help="Drop the ensemble's external members "
                                       "(prediction files, which cannot score new audio) instead of refusing."),
    timeline: bool = typer.Option(False, "--timeline", help="Emotion over time: cut each file into speech segments "
                                  "and predict every segment (tables, summary and figures in --out)."),
    segment: str = typer.Option("vad", "--segment", help="--timeline: vad (speech segments) or fixed (a grid)."),
    min_segment: float = typer.Option(2.0, "--min-segment", help="--timeline vad: shortest segment (s)."),
    max_segment: float = typer.Option(12.0, "--max-segment", help="--timeline vad: longest segment (s)."),
    window: float = typer.Option(4.0, "--window", help="--timeline fixed: window length (s)."),
    hop: float = typer.Option(2.0, "--hop", help="--timeline fixed: a window every HOP seconds."),
    workers: int = typer.Option(0, "--workers", min=0, help="--timeline: run the files in N Ray actors (one per GPU "
                                "where the cluster has GPUs, else CPU actors splitting the cores); each commits its "
                                "files to --out. 0: in this process."),
    address: str = typer.Option(None, "--address", help="--timeline --workers: an existing Ray cluster (e.g. "
                                "ray://head:10001 or auto); default: a local Ray for the run."),
    store: str = typer.Option(None, "--store", help="--timeline: also write each segment's encoder features to this "
                              "feature store (path or URL; ids <file>#<start_ms>-<end_ms>, one part per file)."),
    storage_options: str = STORAGE_OPTIONS,
) -> None:
    """Run the encoders and the ensemble on audio: class, 8 class probabilities, arousal, valence, dominance (per
    file, or per segment over time with --timeline)."""
    options = parse_storage_options(storage_options)
    if not timeline and (workers or address or store):
        raise UsageError("--workers, --address and --store work with --timeline only")
    if address and not workers:
        raise UsageError("--address names the Ray cluster for --workers N; give --workers too")
    if not timeline:
        check_output_file(Path(out) if out else None, "--out")
    if timeline:
        _timeline(inputs, ensemble, out, device, skip_external, options, workers, address, store,
                  segment=segment, min_segment_s=min_segment, max_segment_s=max_segment, window_s=window, hop_s=hop)
        return
    from mtser.trainer.predict import long_files, predict_files

    run = predict_files(inputs, ensemble, device=device, transcripts=transcripts, skip_external=skip_external,
                        storage_options=options)
    if out:
        run.table.to_csv(out, index=False, float_format="%.6f")
        typer.echo(f"wrote {len(run.table)} rows to {out}")
    else:
        typer.echo(run.table.to_string(index=False, float_format="%.4f"))
    for name, seconds in long_files(run.table["FileName"].tolist(), max_segment, options).items():
        typer.echo(f"note: {name} is {seconds:.0f} s long: this is one prediction for the whole file; "
                   "`--timeline` predicts each speech segment over time", err=True)
    for name, reason in run.failures.items():
        typer.echo(f"skipped {name}: {reason}", err=True)
    if run.failures:
        raise typer.Exit(1)


def _timeline(inputs: list[str], ensemble: str, out: str | None, device: str, skip_external: bool,
              options: dict | None, workers: int, address: str | None, store: str | None, **settings) -> None:
    from mtser.configio import from_dict
    from mtser.featurestore.config import TimelineConfig
    from mtser.trainer.timeline import predict_timeline, status_line

    if not out:
        raise UsageError("--timeline needs --out FOLDER (tables, summary and figures are written there)")
    cfg = from_dict(TimelineConfig, settings, "timeline")
    run = predict_timeline(inputs, ensemble, out, cfg, device=device, skip_external=skip_external,
                           storage_options=options, workers=workers, address=address, store=store)
    typer.echo(status_line(run))
    typer.echo(f"wrote segments.csv/.parquet, summary.csv/.parquet, timeline.html and png/ to {out}")
    if store:
        typer.echo(f"segment features in the feature store {store} (`mtser features ls {store}`)")
    for name, reason in run.failures.items():
        typer.echo(f"failed {name}: {reason}", err=True)
    if run.failures:
        raise typer.Exit(1)


def report(
    run: str = typer.Argument(..., help="Run folder of `mtser tune` (path or URL)."),
    out: str = typer.Option(None, "--out", help="Output folder, path or URL (default RUN/report)."),
    storage_options: str = STORAGE_OPTIONS,
) -> None:
    """PNG figures and one self-contained HTML page for a search run."""
    from mtser.trainer.report import ensemble_summary, write_report

    options = parse_storage_options(storage_options)
    page = write_report(run, out, options)
    summary = ensemble_summary(run, options)
    if summary is not None:
        typer.echo("ensemble metrics:")
        typer.echo(summary.dropna(how="all").to_string(float_format="%.4f"))
    typer.echo(f"report: {page}")


def register(app: typer.Typer) -> None:
    for command in (tune, ensemble, predict, report):
        app.command()(command)
