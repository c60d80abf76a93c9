"""Figures of a search run and one self-contained HTML page (PNGs embedded as base64).

Figures: the ensemble's development confusion matrix, α×β heatmaps of stage-1 development metrics per pooling,
predicted-versus-true scatter per attribute, and training curves of every trial. Tables: the ensemble's metrics,
the paper's Table 1 layout of the stage-1 settings (`table1`, also written as table1.csv), and every trial.
"""
from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from mtser.featurestore.labels import ATTRIBUTE_COLUMNS, ATTRIBUTES, CLASSES
from mtser.trainer.runs import METRIC_COLUMNS, TEST_COLUMNS, RunFolder, as_run, load_results

TABLE1_METRICS = ["f1", "ccc_arousal", "ccc_valence", "ccc_dominance", "ccc_mean", "challenge_f1",
                  "challenge_ccc_mean"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(pred: pd.DataFrame, path: Path) -> Path | None:
    labelled = pred[pred["true_EmoClass"].isin(CLASSES)] if "true_EmoClass" in pred else pred.iloc[:0]
    if labelled.empty:
        return None
    plt = _pyplot()
    index = {c: i for i, c in enumerate(CLASSES)}
    counts = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    np.add.at(counts, (labelled["true_EmoClass"].map(index).to_numpy(), labelled["EmoClass"].map(index).to_numpy()), 1)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if share[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(CLASSES)), yticks=range(len(CLASSES)), xticklabels=CLASSES, yticklabels=CLASSES,
           xlabel="predicted", ylabel="true", title="Ensemble, development (row-normalised; counts)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def heatmap_figure(results: pd.DataFrame, path: Path) -> Path | None:
    stage1 = results[(results["stage"] == 1) & results["f1"].notna()]
    if stage1.empty:
        return None
    plt = _pyplot()
    poolings = sorted(stage1["pooling"].unique())
    metrics = ["f1", "ccc_mean"]
    fig, axes = plt.subplots(len(poolings), len(metrics), figsize=(4.5 * len(metrics), 3.8 * len(poolings)),
                             squeeze=False)
    for row, pooling in enumerate(poolings):
        for col, metric in enumerate(metrics):
            grid = stage1[stage1["pooling"] == pooling].pivot_table(index="alpha", columns="beta", values=metric)
            ax = axes[row, col]
            image = ax.imshow(grid.to_numpy(), cmap="viridis", origin="lower")
            for (i, j), v in np.ndenumerate(grid.to_numpy()):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8, color="white")
            ax.set(xticks=range(grid.shape[1]), yticks=range(grid.shape[0]),
                   xticklabels=[f"{b:g}" for b in grid.columns], yticklabels=[f"{a:g}" for a in grid.index],
                   xlabel="β (class loss)", ylabel="α (attribute loss)", title=f"{pooling}: development {metric}")
            fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def scatter_figure(pred: pd.DataFrame, path: Path) -> Path | None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ATTRIBUTES), figsize=(4.2 * len(ATTRIBUTES), 4))
    drawn = False
    for ax, name in zip(axes, ATTRIBUTES):
        column = ATTRIBUTE_COLUMNS[name]
        known = pred[pred[f"true_{column}"].notna()] if f"true_{column}" in pred else pred.iloc[:0]
        if known.empty:
            continue
        drawn = True
        ax.scatter(known[f"true_{column}"], known[column], s=8, alpha=0.6)
        ax.plot([1, 7], [1, 7], color="grey", linewidth=1)
        ax.set(xlim=(1, 7), ylim=(1, 7), xlabel=f"true {name}", ylabel=f"predicted {name}",
               title=f"Ensemble, development {name}")
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, path)


def table1(results: pd.DataFrame) -> pd.DataFrame | None:
    """The paper's Table 1: per stage-1 setting (α, β, pooling) macro-F1, CCC per attribute and their mean, on
    Development as the test split when the run selected on held-out Train (`train.validation`), else on the
    Development split it selected on (the `split` column says which). `challenge_*`: the challenge's way."""
    stage1 = results[results["stage"] == 1]
    if stage1.empty:
        return None
    tested = stage1[[f"test_{m}" for m in TABLE1_METRICS]].notna().any(axis=None)
    rows = []
    for _, r in stage1.iterrows():
        setting = ("single-task: attributes" if r["beta"] == 0 else "single-task: classes" if r["alpha"] == 0
                   else "multi-task")
        values = {m: r[f"test_{m}" if tested else m] for m in TABLE1_METRICS}
        rows.append({"setting": setting, "alpha": r["alpha"], "beta": r["beta"], "pooling": r["pooling"],
                     "split": "Development (test)" if tested else "Development (selection)", **values})
    order = {"single-task: attributes": 0, "single-task: classes": 1, "multi-task": 2}
    return pd.DataFrame(sorted(rows, key=lambda r: (order[r["setting"]], r["pooling"], r["alpha"])))


def curves_figure(run_dir: RunFolder, results: pd.DataFrame, path: Path) -> Path | None:
    histories = {}
    for _, row in results.iterrows():
        try:
            histories[(row["stage"], row["trial"])] = run_dir.read_csv(f"stage{row['stage']}/{row['trial']}/history.csv")
        except FileNotFoundError:
            continue
    if not histories:
        return None
    plt = _pyplot()
    panels = [("train_loss", "training loss"), ("f1", "development macro-F1"), ("ccc_mean", "development mean CCC")]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 7), squeeze=False)
    for (stage, trial), history in histories.items():
        for col, (column, title) in enumerate(panels):
            if column in history:
                axes[stage - 1, col].plot(history["epoch"], history[column], marker=".", label=trial)
    for stage in (1, 2):
        for col, (_, title) in enumerate(panels):
            axes[stage - 1, col].set(xlabel="epoch", title=f"stage {stage}: {title}")
        if axes[stage - 1, 0].lines:
            axes[stage - 1, 0].legend(fontsize=6)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, storage_options: dict | None = None
                 ) -> str:
    """Draw every figure the run has data for and write `index.html`; returns its path or URL. The run and the
    output folder may be URLs: figures are drawn in a temporary local folder, then written to the output folder."""
    run_dir = as_run(run_dir, storage_options)
    out = RunFolder(out_dir, storage_options) if out_dir else run_dir.sub("report")
    results = load_results(run_dir)
    try:
        pred = run_dir.read_csv("ensemble/Development/predictions.csv")
    except FileNotFoundError:
        pred = None
    with tempfile.TemporaryDirectory() as tmp:
        drawn = Path(tmp)
        figures = {
            "Confusion matrix": confusion_figure(pred, drawn / "confusion.png") if pred is not None else None,
            "α × β heatmaps": heatmap_figure(results, drawn / "heatmap.png"),
            "Predicted versus true attributes": scatter_figure(pred, drawn / "scatter.png") if pred is not None else None,
            "Training curves": curves_figure(run_dir, results, drawn / "curves.png"),
        }
        settings = table1(results)
        if settings is not None:
            out.write_csv("table1.csv", settings, "%.4f")
        page = _html(run_dir, results, figures, ensemble_summary(run_dir), settings)
        for path in figures.values():
            if path is not None:
                out.upload(path, path.name)
    out.write_bytes("index.html", page.encode())
    return out.url_of("index.html")


def ensemble_summary(run_dir: RunFolder | str | Path, storage_options: dict | None = None) -> pd.DataFrame | None:
    """The ensemble's metrics, one row per scored split (None before `mtser ensemble`)."""
    try:
        metrics = as_run(run_dir, storage_options).read_json("ensemble/ensemble.json").get("metrics", {})
    except FileNotFoundError:
        return None
    return pd.DataFrame(metrics).T if metrics else None


def _html(run_dir: RunFolder, results: pd.DataFrame, figures: dict[str, Path | None], ensemble: pd.DataFrame | None,
          settings: pd.DataFrame | None) -> str:
    parts = [f"<h1>mtser search report: {html.escape(str(run_dir))}</h1>"]
    note = ("<p>Ours: macro-F1 over the 8 classes, CCC without X rows. <code>challenge_*</code>: the challenge "
            "baseline's way, macro-F1 over the classes present and CCC over all rows, X included.</p>")
    if ensemble is not None:
        parts += ["<h2>Ensemble</h2>", ensemble.to_html(float_format="%.4f", na_rep=""), note]
    if settings is not None:
        parts += ["<h2>Table 1: stage-1 settings (the paper's ablation layout)</h2>",
                  settings.to_html(index=False, float_format="%.4f", na_rep="", table_id="table1"), note]
    tested = [c for c in TEST_COLUMNS if c in results and results[c].notna().any()]
    shown = results[[c for c in ("stage", "trial", "cohort", "task", "sigma", "status", "best_epoch", *METRIC_COLUMNS,
                                 *tested) if c in results]]
    parts += ["<h2>Trials</h2>", shown.to_html(index=False, float_format="%.4f", na_rep="")]
    for title, path in figures.items():
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if path is None:
            parts.append("<p>No data for this figure (run `mtser ensemble` for the ensemble figures).</p>")
        else:
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:2px 8px}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>mtser report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")
