"""Figures of a search run and one self-contained HTML page (PNGs embedded as base64, one PNG per panel).

Figures: the ensemble's development confusion matrix, α×β heatmaps of stage-1 development metrics per pooling (and
grid axes), predicted-versus-true scatter per attribute, the learned layer weights per encoder and member
(`report_layers`; only where members have them), and the learning curves of each cohort (one figure per cohort, one
line per member; histories read through `runs.read_history`). Tables: the ensemble's metrics, the paper's Table 1
layout of the stage-1 settings (`table1`, also written as table1.csv) and every trial; numbers right-aligned, metrics
to PRECISION decimals, the best of each metric column marked. Labels on coloured cells are black or white, whichever
contrasts more with the cell (`text_colour`).
"""
from __future__ import annotations

import base64
import html
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtser.featurestore.labels import ATTRIBUTE_COLUMNS, ATTRIBUTES, CLASSES
from mtser.trainer.report_layers import draw_layer_weights, layer_caption, run_layer_weights
from mtser.trainer.runs import (METRIC_COLUMNS, TEST_COLUMNS, RunFolder, architecture, as_run, load_results,
                                read_history)

Panel = tuple[str, Any]                         # (file-name suffix, matplotlib Figure)
PRECISION = 4                                   # decimals of every metric in the page's tables
PARAMETERS = ("alpha", "beta", "sigma")         # shown with as many decimals as their values need
CURVE_PANELS = [("train_loss", "training loss"), ("f1", "macro-F1, selection split"),
                ("ccc_mean", "mean CCC, selection split")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------------ colours
def relative_luminance(rgb: Sequence[float]) -> float:
    """WCAG 2 relative luminance of an sRGB colour (channels in [0, 1]; an alpha channel is ignored)."""
    channels = np.asarray(rgb[:3], dtype=float)
    linear = np.where(channels <= 0.04045, channels / 12.92, ((channels + 0.055) / 1.055) ** 2.4)
    return float(linear @ [0.2126, 0.7152, 0.0722])


def contrast_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """WCAG 2 contrast ratio of two colours, 1 to 21."""
    light, dark = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def text_colour(background: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with `background` (at least 4.58 : 1 for any colour)."""
    black, white = contrast_ratio(background, (0, 0, 0)), contrast_ratio(background, (1, 1, 1))
    return "black" if black >= white else "white"


# ------------------------------------------------------------------------------------------------------ figures
# Every figure is a list of panels, one PNG each (`Panel`: file-name suffix, matplotlib figure), so that the page
# lays them out side by side on a wide screen and one under another on a phone, each at a readable size.
def _annotate(ax, image, values: np.ndarray, labels: np.ndarray) -> None:
    """Write `labels` on the finite cells of the imshow `image` of `values`, each in its cell's text colour."""
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(j, i, labels[i, j], ha="center", va="center", fontsize=9,
                    color=text_colour(image.to_rgba(value)))


def draw_confusion(pred: pd.DataFrame) -> list[Panel]:
    """The ensemble's development confusion matrix, row-normalised colours, counts as labels ([] without labels)."""
    labelled = pred[pred["true_EmoClass"].isin(CLASSES)] if "true_EmoClass" in pred else pred.iloc[:0]
    if labelled.empty:
        return []
    plt = _pyplot()
    index = {c: i for i, c in enumerate(CLASSES)}
    counts = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    np.add.at(counts, (labelled["true_EmoClass"].map(index).to_numpy(), labelled["EmoClass"].map(index).to_numpy()), 1)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(5.2, 4.6), layout="constrained")
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    _annotate(ax, image, share, counts.astype(str))
    ax.set(xticks=range(len(CLASSES)), yticks=range(len(CLASSES)), xticklabels=CLASSES, yticklabels=CLASSES,
           xlabel="predicted", ylabel="true", title="Ensemble, development (row-normalised; counts)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return [("", fig)]


def draw_heatmaps(results: pd.DataFrame) -> list[Panel]:
    """α × β heatmaps of stage-1 development F1 and mean CCC, one panel per pooling and metric, each cell labelled
    with its value in black or white by the cell's colour ([] without stage-1 metrics)."""
    stage1 = results[(results["stage"] == 1) & results["f1"].notna()]
    if stage1.empty:
        return []
    plt = _pyplot()
    panels = []
    for pooling, points in stage1.groupby(architecture(stage1)):     # and grid axes: `asp`, `asp_lw=on`, ...
        for metric in ("f1", "ccc_mean"):
            grid = points.pivot_table(index="alpha", columns="beta", values=metric)
            values = grid.to_numpy()
            fig, ax = plt.subplots(figsize=(4.6, 3.8), layout="constrained")
            image = ax.imshow(values, cmap="viridis", origin="lower")
            _annotate(ax, image, values, np.vectorize(lambda v: f"{v:.3f}")(values))
            ax.set(xticks=range(grid.shape[1]), yticks=range(grid.shape[0]),
                   xticklabels=[f"{b:g}" for b in grid.columns], yticklabels=[f"{a:g}" for a in grid.index],
                   xlabel="β (class loss)", ylabel="α (attribute loss)", title=f"{pooling}: development {metric}")
            fig.colorbar(image, ax=ax, fraction=0.046)
            panels.append((f"{pooling}-{metric}", fig))
    return panels


def draw_scatter(pred: pd.DataFrame) -> list[Panel]:
    """Predicted versus true value per attribute with known true values."""
    panels = []
    for name in ATTRIBUTES:
        column = ATTRIBUTE_COLUMNS[name]
        known = pred[pred[f"true_{column}"].notna()] if f"true_{column}" in pred else pred.iloc[:0]
        if known.empty:
            continue
        fig, ax = _pyplot().subplots(figsize=(3.6, 3.6), layout="constrained")
        ax.scatter(known[f"true_{column}"], known[column], s=8, alpha=0.6)
        ax.plot([1, 7], [1, 7], color="grey", linewidth=1)
        ax.set(xlim=(1, 7), ylim=(1, 7), xlabel=f"true {name}", ylabel=f"predicted {name}",
               title=f"Ensemble, development {name}")
        panels.append((name, fig))
    return panels


def cohorts(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The grid points of each cohort (by stage, then name); points no cohort has started are left out."""
    started = results[results["cohort"].notna()]
    order = started.groupby("cohort", sort=False)["stage"].min().reset_index().sort_values(["stage", "cohort"])
    return {name: started[started["cohort"] == name] for name in order["cohort"]}


def member_styles(members: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(colour as #rrggbb, matplotlib line style) per member: tab10 up to 10 members, tab20 and dashes beyond."""
    import matplotlib.colors

    palette = _pyplot().get_cmap("tab10" if len(members) <= 10 else "tab20")
    return {m: (matplotlib.colors.to_hex(palette(k % palette.N)), ("-", "--", ":")[k // palette.N % 3])
            for k, m in enumerate(members)}


def cohort_histories(run_dir: RunFolder, members: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The history of each member of a cohort (its rows of the results table) that finished an epoch."""
    return {row.trial: history for row in members.itertuples()
            if (history := read_history(run_dir, int(row.stage), row.trial)) is not None}


def draw_curves(histories: dict[str, pd.DataFrame], best_epochs: dict[str, float]) -> list[Panel]:
    """One cohort's learning curves: a panel per CURVE_PANELS column any member has, one line per member in its
    `member_styles` style, each member's best epoch ringed on the metric panels."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    styles = member_styles(list(histories))
    panels = []
    for column, title in CURVE_PANELS:
        if not any(column in h and h[column].notna().any() for h in histories.values()):
            continue
        fig, ax = plt.subplots(figsize=(3.6, 3.0), layout="constrained")
        for member, history in histories.items():
            if column not in history:
                continue
            colour, line = styles[member]
            ax.plot(history["epoch"], history[column], marker=".", color=colour, linestyle=line, label=member)
            best = history[history["epoch"] == best_epochs.get(member)]
            if column != "train_loss" and not best.empty:
                ax.plot(best["epoch"], best[column], marker="o", markersize=9, fillstyle="none", linestyle="",
                        color=colour)
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        panels.append((column, fig))
    return panels


def save_panels(panels: list[Panel], folder: Path, stem: str) -> list[Path]:
    """Write each panel as `<stem>[-<suffix>].png` in `folder` and close it."""
    paths = []
    for suffix, fig in panels:
        path = folder / f"{_slug(f'{stem}-{suffix}' if suffix else stem)}.png"
        fig.savefig(path, dpi=110)
        _pyplot().close(fig)
        paths.append(path)
    return paths


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# ------------------------------------------------------------------------------------------------------ tables
def table1(results: pd.DataFrame) -> pd.DataFrame | None:
    """The paper's Table 1: per stage-1 setting (α, β, pooling) macro-F1, CCC per attribute and their mean, on
    Development as the test split when the run selected on held-out Train (`train.validation`), else on the
    Development split it selected on (the `split` column says which). `challenge_*`: the challenge's way."""
    stage1 = results[results["stage"] == 1]
    if stage1.empty:
        return None
    tested = stage1[[f"test_{m}" for m in METRIC_COLUMNS]].notna().any(axis=None)
    rows = []
    for (_, r), pooling in zip(stage1.iterrows(), architecture(stage1)):
        setting = ("single-task: attributes" if r["beta"] == 0 else "single-task: classes" if r["alpha"] == 0
                   else "multi-task")
        values = {m: r[f"test_{m}" if tested else m] for m in METRIC_COLUMNS}
        rows.append({"setting": setting, "alpha": r["alpha"], "beta": r["beta"], "pooling": pooling,
                     "split": "Development (test)" if tested else "Development (selection)", **values})
    order = {"single-task: attributes": 0, "single-task: classes": 1, "multi-task": 2}
    return pd.DataFrame(sorted(rows, key=lambda r: (order[r["setting"]], r["pooling"], r["alpha"])))


def _decimals(name: str, values: pd.Series) -> int:
    """Decimals of a numeric column: PRECISION for metrics, what the values need (≤ PRECISION) for α, β, σ,
    none for counts (stage, epoch)."""
    finite = values[np.isfinite(values.astype(float))].astype(float)
    if name in PARAMETERS:
        return max((len(f"{v:.{PRECISION}f}".rstrip("0").partition(".")[2]) for v in finite), default=0)
    integral = (finite == finite.round()).all()
    return 0 if integral and name not in {*METRIC_COLUMNS, *TEST_COLUMNS} else PRECISION


def html_table(frame: pd.DataFrame, best: Sequence[str] = (), table_id: str | None = None) -> str:
    """`frame` as an HTML table in a horizontally scrolling box: numeric columns right-aligned (class `num`) at one
    precision per column (`_decimals`); in each column of `best` (higher is better) the cells equal to the column's
    highest value at that precision are marked (class `best`, bold)."""
    numeric = {c for c in frame.columns
               if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])}
    decimals = {c: _decimals(c, frame[c]) for c in numeric}
    tops = {c: frame[c].astype(float).round(decimals[c]).max() for c in best if c in numeric and frame[c].notna().any()}
    head = "".join(f'<th scope="col"{" class=num" if c in numeric else ""}>'
                   f'{html.escape(str(c)).replace("_", "_<wbr>")}</th>' for c in frame.columns)   # names break at _
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, record):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append('<td class="num na">–</td>' if column in numeric else "<td></td>")
            elif column in numeric:
                text = f"{float(value):.{decimals[column]}f}"
                if column in tops and round(float(value), decimals[column]) == tops[column]:
                    cells.append(f'<td class="num best" title="best in column"><strong>{text}</strong></td>')
                else:
                    cells.append(f'<td class="num">{text}</td>')
            else:
                cells.append(f"<td>{html.escape(str(value))}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    return (f'<div class="scroll"><table{ident}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def ensemble_summary(run_dir: RunFolder | str | Path, storage_options: dict | None = None) -> pd.DataFrame | None:
    """The ensemble's metrics, one row per scored split (None before `mtser ensemble`)."""
    try:
        metrics = as_run(run_dir, storage_options).read_json("ensemble/ensemble.json").get("metrics", {})
    except FileNotFoundError:
        return None
    return pd.DataFrame(metrics).T if metrics else None


# ------------------------------------------------------------------------------------------------------ the page
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
        pred = pd.DataFrame()                   # no ensemble yet: no confusion matrix, no scatter
    with tempfile.TemporaryDirectory() as tmp:
        drawn = Path(tmp)
        figures = {
            "Confusion matrix": save_panels(draw_confusion(pred), drawn, "confusion"),
            "α × β heatmaps": save_panels(draw_heatmaps(results), drawn, "heatmap"),
            "Predicted versus true attributes": save_panels(draw_scatter(pred), drawn, "scatter"),
        }
        curves = {}
        for name, members in cohorts(results).items():
            histories = cohort_histories(run_dir, members)
            panels = draw_curves(histories, dict(zip(members["trial"], members["best_epoch"])))
            curves[name] = (members, list(histories), save_panels(panels, drawn, f"curves-{name}"))
        layers = run_layer_weights(run_dir, results)
        figures["Layer weights"] = save_panels(draw_layer_weights(layers), drawn, "layers")
        settings = table1(results)
        if settings is not None:
            out.write_csv("table1.csv", settings, "%.4f")
        page = _html(run_dir, results, figures, curves, ensemble_summary(run_dir), settings,
                     {"layers": layer_caption(layers)})
        for paths in [*figures.values(), *(paths for *_, paths in curves.values())]:
            for path in paths:
                out.upload(path, path.name)
    out.write_bytes("index.html", page.encode())
    return out.url_of("index.html")


STYLE = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--zebra:#f6f8fa;--best:#dafbe1;--bestline:#1a7f37}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
 margin:0;padding:0 16px;background:#fff}
main{max-width:1240px;margin:0 auto;padding:8px 0 48px}
h1{font-size:1.6em;margin:.6em 0 .2em}h2{font-size:1.25em;margin:1.8em 0 .4em;padding-bottom:.2em;
 border-bottom:1px solid var(--line)}h3{font-size:1.05em;margin:1.4em 0 .3em;overflow-wrap:anywhere}
.run{color:var(--muted);overflow-wrap:anywhere;margin:0}
nav{display:flex;flex-wrap:wrap;gap:.2em 1.2em;margin:.8em 0;font-size:.95em}
p.note{color:var(--muted);font-size:.9em;max-width:70em}
code{font-size:.9em;background:var(--zebra);padding:0 .25em;border-radius:3px}
.scroll{overflow-x:auto;width:fit-content;max-width:100%;border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse;font-size:.88em}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:bottom}
th{background:var(--zebra);font-weight:600}
td{white-space:nowrap;background:#fff}tbody tr:nth-child(even) td{background:var(--zebra)}
tbody tr:last-child td{border-bottom:0}
th.num,td.num{text-align:right;font-variant-numeric:tabular-nums}
td.na{color:var(--muted)}
tbody tr td.best{background:var(--best);box-shadow:inset 3px 0 0 var(--bestline)}
th:first-child,td:first-child{position:sticky;left:0;z-index:1;box-shadow:1px 0 0 var(--line)}
figure{margin:.6em 0 1.2em}.panels{display:flex;flex-wrap:wrap;gap:8px 12px;align-items:flex-start}
.panels img{display:block;max-width:100%;height:auto}
figcaption{color:var(--muted);font-size:.9em;margin-top:.3em;overflow-wrap:anywhere}
ul.legend{list-style:none;padding:0;margin:.4em 0;display:flex;flex-wrap:wrap;gap:.1em 1.2em;font-size:.9em}
ul.legend li{display:flex;align-items:center;gap:.4em;overflow-wrap:anywhere}ul.legend svg{flex:none}
@media (max-width:640px){body{font-size:14px;padding:0 10px}th,td{padding:3px 6px}
 th:first-child,td:first-child{position:static;box-shadow:none}}
"""
DASHES = {"-": "", "--": "6 3", ":": "2 3"}


def _figure(title: str, paths: list[Path], caption: str = "") -> str:
    """A figure of PNG panels embedded as data URLs, with an optional caption (HTML)."""
    images = "".join(f'<img alt="{html.escape(title)}: {html.escape(p.stem)}" '
                     f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for p in paths)
    text = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><div class="panels">{images}</div>{text}</figure>'


def _legend(members: list[str]) -> str:
    """The members' line styles (`member_styles`) as an HTML list, readable at any page width."""
    items = "".join(f'<li><svg width="30" height="10" aria-hidden="true"><line x1="1" y1="5" x2="29" y2="5" '
                    f'stroke="{colour}" stroke-width="2.5" stroke-dasharray="{DASHES[line]}"/></svg>'
                    f"{html.escape(member)}</li>" for member, (colour, line) in member_styles(members).items())
    return f'<ul class="legend">{items}</ul>'


def _html(run_dir: RunFolder, results: pd.DataFrame, figures: dict[str, list[Path]],
          curves: dict[str, tuple[pd.DataFrame, list[str], list[Path]]], ensemble: pd.DataFrame | None,
          settings: pd.DataFrame | None, captions: dict[str, str]) -> str:
    sections: list[tuple[str, str, str]] = []                  # (anchor, title, body)
    note = ('<p class="note">Ours: macro-F1 over the 8 classes, CCC without X rows. <code>challenge_*</code>: the '
            "challenge baseline's way, macro-F1 over the classes present and CCC over all rows, X included.</p>")
    marked = f'<p class="note">Metrics to {PRECISION} decimals; bold on green: the best value of its column.</p>'
    if ensemble is not None:
        scored = ensemble.dropna(how="all").rename_axis("split").reset_index()
        sections.append(("ensemble", "Ensemble", html_table(scored) + note))
    if settings is not None:
        split = f'<p class="note">Scored on {html.escape(settings["split"].iloc[0])}.</p>'   # one split per table
        sections.append(("table1", "Table 1: stage-1 settings (the paper's ablation layout)",
                         split + html_table(settings.drop(columns="split"), best=METRIC_COLUMNS, table_id="table1")
                         + marked + note))
    tested = [c for c in TEST_COLUMNS if c in results and results[c].notna().any()]
    entropy = ["layer_entropy"] if "layer_entropy" in results and results["layer_entropy"].notna().any() else []
    shown = results[[c for c in ("trial", "stage", "task", "sigma", "status", "best_epoch", *METRIC_COLUMNS, *tested,
                                 *entropy, "cohort") if c in results]]
    sections.append(("trials", "Trials", html_table(shown, best=[*METRIC_COLUMNS, *tested], table_id="trials")
                     + marked))
    missing = '<p class="note">No data for this figure (run <code>mtser ensemble</code> for the ensemble figures).</p>'
    for anchor, (title, paths) in zip(("confusion", "heatmaps", "scatter", "layers"), figures.items()):
        if paths or anchor != "layers":                        # the layer weights only where members learned them
            sections.append((anchor, title, _figure(title, paths, captions.get(anchor, "")) if paths else missing))
    blocks = []
    for name, (members, drawn, paths) in curves.items():
        caption = (f"Stage {int(members['stage'].min())}, {len(members)} member{'s' * (len(members) != 1)}"
                   f"{'' if len(drawn) == len(members) else f' ({len(drawn)} with a finished epoch)'}. Ringed: "
                   "each member's best epoch (its checkpoint).")
        body = (_legend(drawn) + _figure(f"learning curves of cohort {name}", paths, caption) if paths
                else '<p class="note">No epoch finished yet.</p>')
        blocks.append(f'<section class="cohort" data-cohort="{html.escape(name)}"><h3>Cohort {html.escape(name)}</h3>'
                      f"{body}</section>")
    sections.append(("curves", "Learning curves per cohort",
                     "".join(blocks) or '<p class="note">No cohort has started.</p>'))
    nav = "".join(f'<a href="#{anchor}">{html.escape(title.split(":")[0])}</a>' for anchor, title, _ in sections)
    body = "".join(f'<section><h2 id="{anchor}">{html.escape(title)}</h2>{content}</section>'
                   for anchor, title, content in sections)
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'><title>mtser report</title>"
            f"<style>{STYLE}</style></head><body><main><h1>mtser search report</h1>"
            f"<p class='run'>{html.escape(str(run_dir))}</p><nav>{nav}</nav>{body}</main></body></html>\n")
