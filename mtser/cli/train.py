"""`mtser train` (stage 1), `mtser finetune` (stage 2) and `mtser evaluate`: parse, call mtser.trainer.loop (and infer), print."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from mtser.cli.options import STORAGE_OPTIONS, check_output_file, parse_storage_options
from mtser.errors import UsageError

OVERWRITE = typer.Option(False, "--overwrite", help="Replace the results (best/, history.csv) in a non-empty --out.")
METRIC_ORDER = ("f1", "ccc_arousal", "ccc_valence", "ccc_dominance", "ccc_mean", "score", "loss")


def _metric_line(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_ORDER if k in metrics)


def _epoch_printer(held_out: bool):
    """Prints each epoch; its metrics are on Development, or on the held-out Train speakers (`validation`)."""
    split = "held-out" if held_out else "dev"

    def show(epoch: int, row: dict[str, float], best_dir: Path | None) -> None:
        typer.echo(f"epoch {epoch:3d}  lr {row['lr']:.2e}  train_loss {row['train_loss']:.4f}  "
                   f"data_wait {row['data_wait_fraction']:.0%}  {split}: {_metric_line(row)}"
                   + ("  *best" if best_dir else ""))
    return show


def _overrides(pairs: list[str]) -> dict:
    """`key=value` pairs, values parsed as YAML (numbers, null, lists); ConfigError names a bad one."""
    from mtser.configio import parse_yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.epochs=10")
        out[key.strip()] = parse_yaml(value, f"--set {key.strip()}")
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that holds anything unless `overwrite` (then its earlier best/ and history.csv are removed
    first, so that a run that fails early leaves none of the old results looking new)."""
    import shutil

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise UsageError(f"--out {out}: folder is not empty (holds {', '.join(held[:5])}"
                         f"{', ...' if len(held) > 5 else ''}); pass --overwrite to replace its results, or choose "
                         "another folder")
    if held:
        shutil.rmtree(out / "best", ignore_errors=True)
        (out / "history.csv").unlink(missing_ok=True)


def _print_result(result) -> None:
    """The best epoch's metrics, the test metrics if any, and where the checkpoint is."""
    typer.echo(f"best epoch {result.best_epoch}: {_metric_line(result.best_metrics)}")
    if result.test_metrics is not None:
        typer.echo(f"test (Development): {_metric_line(result.test_metrics)}")
    typer.echo(f"checkpoint: {result.best_checkpoint}")


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        config: Path = typer.Option(..., "--config", help="Recipe config (configs/paper.yaml)."),
        store: str = typer.Option(..., "--store", help="Feature store URL or path."),
        out: Path = typer.Option(..., "--out", help="Output directory (best/ checkpoint, history.csv); must be "
                                                    "empty or new unless --overwrite."),
        overwrite: bool = OVERWRITE,
        set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set train.epochs=10."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar per epoch."),
        storage_options: str = STORAGE_OPTIONS,
    ) -> None:
        """Stage 1: multi-task pre-training on the store's Train split, selected on Development."""
        from mtser.trainer.config import load_config
        from mtser.trainer.loop import train

        cfg = load_config(config, _overrides(set_))
        options = parse_storage_options(storage_options)
        _check_out(out, overwrite)
        _print_result(train(cfg, store, out, stage="pretrain",
                            on_epoch=_epoch_printer(cfg.train.validation is not None), progress=progress,
                            storage_options=options))

    @app.command("finetune")
    def finetune_command(
        from_: str = typer.Option(..., "--from", help="Stage-1 checkpoint directory (path or URL)."),
        task: str = typer.Option(..., "--task", help="cat (classes, plain CE) or dim (attributes)."),
        store: str = typer.Option(..., "--store", help="Feature store URL or path."),
        out: Path = typer.Option(..., "--out", help="Output directory; must be empty or new unless --overwrite."),
        overwrite: bool = OVERWRITE,
        sigma: Optional[str] = typer.Option(None, "--sigma", help="dim: Gaussian-penalty width, or 'none' (plain MSE)."),
        config: Optional[Path] = typer.Option(None, "--config", help="Config (default: the checkpoint's)."),
        set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set finetune.cat.epochs=5."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
        storage_options: str = STORAGE_OPTIONS,
    ) -> None:
        """Stage 2: fine-tune a stage-1 checkpoint for one task, with that task's schedule (finetune.cat or
        finetune.dim)."""
        from mtser.configio import apply_override, from_dict, to_dict
        from mtser.featurestore.files import absolute, is_url
        from mtser.trainer.checkpoint import read_sidecar
        from mtser.trainer.config import Config, load_config
        from mtser.trainer.loop import finetune_config, train

        if task not in ("cat", "dim"):
            raise UsageError(f"--task: expected cat or dim, got {task!r}")
        try:
            width = None if sigma is None or sigma.lower() == "none" else float(sigma)
            if width is not None and not (math.isfinite(width) and width > 0):
                raise ValueError
        except ValueError:
            raise UsageError(f"--sigma: expected a positive number or 'none', got {sigma!r}") from None
        if width is not None and task != "dim":
            raise UsageError("--sigma: only applies to --task dim")
        options = parse_storage_options(storage_options)
        if config is not None:
            cfg = load_config(config, _overrides(set_))
        else:
            raw = read_sidecar(from_, options)["config"]
            for key, value in _overrides(set_).items():
                apply_override(raw, key, value)
            cfg = from_dict(Config, raw)
        cfg = from_dict(Config, to_dict(finetune_config(cfg, task, width)))  # re-validated
        if not is_url(from_) and Path(absolute(from_)).is_relative_to(out.resolve()):
            raise UsageError(f"--out {out}: holds the parent checkpoint --from {from_}; choose another folder")
        _check_out(out, overwrite)
        _print_result(train(cfg, store, out, stage="finetune", task=task, init_from=from_,
                            on_epoch=_epoch_printer(cfg.schedule("finetune", task).validation is not None),
                            progress=progress, storage_options=options))

    @app.command("evaluate")
    def evaluate_command(
        checkpoint: str = typer.Argument(..., help="Checkpoint directory (path or URL, e.g. RUN/stage1/<trial>/best)."),
        store: str = typer.Option(..., "--store", help="Feature store URL or path."),
        split: str = typer.Option("Development", "--split", help="Split to score."),
        predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write per-utterance predictions (CSV)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        storage_options: str = STORAGE_OPTIONS,
    ) -> None:
        """Score a checkpoint on a split: macro-F1 over 8 classes, CCC per attribute and their mean."""
        import json

        from mtser.featurestore.labels import SPLITS
        from mtser.trainer.infer import coverage, evaluate, open_if_url

        if split not in SPLITS:
            raise UsageError(f"--split: expected one of {list(SPLITS)}, got {split!r}")
        check_output_file(predictions, "--predictions")
        options = parse_storage_options(storage_options)
        fs = open_if_url(store, options)
        metrics, table = evaluate(checkpoint, fs, split, device=device, storage_options=options)
        scored = coverage(fs, split, len(table))
        if predictions is not None:
            table.to_csv(predictions, index=False, float_format="%.6f")
        typer.echo(f"{split}: {len(table)} utterances  {_metric_line(metrics) or '(no labels: no metrics)'}")
        typer.echo(scored)
        challenge = {k: v for k, v in metrics.items() if k.startswith("challenge_")}
        if challenge:
            typer.echo("challenge-comparable (F1 over the classes present, CCC with X rows): "
                       + "  ".join(f"{k} {v:.4f}" for k, v in challenge.items()))
        typer.echo(json.dumps(metrics))
