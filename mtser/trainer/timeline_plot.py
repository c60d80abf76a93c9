"""Timeline figures: per file, the class probabilities as a stacked band over time (one bar per segment, as wide as
the segment) above arousal/valence/dominance as lines; one interactive HTML page for all files (plotly, its
JavaScript embedded once, so the page works offline; the transcript shows on hover) and a PNG per file
(matplotlib)."""
from __future__ import annotations

import html
import io

import numpy as np
import pandas as pd

from mtser.featurestore.labels import CLASSES
from mtser.trainer.runs import RunFolder

CLASS_NAMES = dict(zip(CLASSES, ["angry", "sad", "happy", "surprise", "fear", "disgust", "contempt", "neutral"]))
CLASS_COLOURS = dict(zip(CLASSES, ["#d62728", "#1f77b4", "#ffbf00", "#9467bd", "#8c564b", "#2ca02c", "#e377c2",
                                   "#b0b0b0"]))
ATTRIBUTE_NAMES = {"EmoAct": "arousal", "EmoVal": "valence", "EmoDom": "dominance"}
ATTRIBUTE_COLOURS = {"EmoAct": "#d62728", "EmoVal": "#2ca02c", "EmoDom": "#1f77b4"}
STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem auto;max-width:1300px;
padding:0 1rem;color:#222}h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;word-break:break-all}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.85rem}th,td{padding:.25rem .5rem;
border-bottom:1px solid #ddd;white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
p.note{color:#555;font-size:.9rem}"""


def file_figure(rows: pd.DataFrame, duration_s: float):
    """The plotly figure of one file's segments (rows of the segment table) on a time axis of the whole file."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = rows.dropna(subset=["EmoClass"]).sort_values("start_s")
    mid = ((rows["start_s"] + rows["end_s"]) / 2).to_numpy()
    width = (rows["end_s"] - rows["start_s"]).to_numpy()
    words = [html.escape(t) if isinstance(t, str) and t else "" for t in rows["transcript"]]
    span = [f"{s:.2f}-{e:.2f} s" for s, e in zip(rows["start_s"], rows["end_s"])]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12, row_heights=[0.55, 0.45],
                        subplot_titles=("class probabilities", "attributes (1-7)"))
    for c in CLASSES:
        fig.add_trace(go.Bar(x=mid, y=rows[f"prob_{c}"], width=width, name=f"{c} {CLASS_NAMES[c]}",
                             marker_color=CLASS_COLOURS[c], marker_line_width=0,
                             customdata=np.stack([span, words], axis=1) if len(rows) else None,
                             hovertemplate=f"{CLASS_NAMES[c]} %{{y:.2f}}<br>%{{customdata[0]}}<br>"
                                           "%{customdata[1]}<extra></extra>"), row=1, col=1)
    for a, name in ATTRIBUTE_NAMES.items():
        fig.add_trace(go.Scatter(x=mid, y=rows[a], mode="lines+markers", name=name,
                                 line={"color": ATTRIBUTE_COLOURS[a]}, marker={"size": 5},
                                 customdata=np.stack([span, words], axis=1) if len(rows) else None,
                                 hovertemplate=f"{name} %{{y:.2f}}<br>%{{customdata[0]}}<br>"
                                               "%{customdata[1]}<extra></extra>"), row=2, col=1)
    fig.update_layout(barmode="stack", bargap=0, height=520, margin={"l": 50, "r": 20, "t": 70, "b": 40},
                      legend={"orientation": "h", "x": 0, "y": 1.08, "yanchor": "bottom", "traceorder": "normal"},
                      template="plotly_white", hovermode="closest")
    fig.update_yaxes(range=[0, 1], row=1, col=1)
    fig.update_yaxes(range=[1, 7], row=2, col=1)
    fig.update_xaxes(range=[0, duration_s])
    fig.update_xaxes(title_text="time (s)", row=2, col=1)
    return fig


def png_figure(rows: pd.DataFrame, title: str, duration_s: float) -> bytes:
    """The same figure as a static PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows.dropna(subset=["EmoClass"]).sort_values("start_s")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 5.5), sharex=True, height_ratios=[1.2, 1])
    base = np.zeros(len(rows))
    for c in CLASSES:
        values = rows[f"prob_{c}"].to_numpy(float)
        top.bar(rows["start_s"], values, width=rows["end_s"] - rows["start_s"], bottom=base, align="edge",
                color=CLASS_COLOURS[c], label=f"{c} {CLASS_NAMES[c]}", linewidth=0)
        base += values
    top.set(ylim=(0, 1), ylabel="class probability", title=title)
    top.legend(ncol=8, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.02), frameon=False)
    mid = (rows["start_s"] + rows["end_s"]) / 2
    for a, name in ATTRIBUTE_NAMES.items():
        bottom.plot(mid, rows[a], marker="o", markersize=3, color=ATTRIBUTE_COLOURS[a], label=name)
    bottom.set(ylim=(1, 7), xlim=(0, duration_s), ylabel="attribute", xlabel="time (s)")
    bottom.legend(ncol=3, fontsize=8, loc="upper right")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def write_figures(folder: RunFolder, segments: pd.DataFrame, summary: pd.DataFrame) -> None:
    """`timeline.html` (all files) and `png/<file key>.png` per file with segments."""
    from mtser.trainer.timeline import file_key

    sections = []
    first = True
    for _, row in summary.iterrows():
        rows = segments[segments["file"] == row["file"]]
        heading = f"<h2>{html.escape(str(row['file']))}</h2>"
        detail = f"<p class='note'>{row['segments']} segments, {row['speech_s']:.1f} s of speech in {row['duration_s']:.1f} s</p>"
        if row["status"] != "ok" or rows["EmoClass"].isna().all():
            sections.append(f"{heading}<p class='note'>{html.escape(str(row['status']))}: "
                            f"{html.escape(str(row.get('reason') or ''))}</p>")
            continue
        fig = file_figure(rows, float(row["duration_s"]))
        sections.append(heading + detail + fig.to_html(full_html=False, include_plotlyjs=first,
                                                       config={"responsive": True, "displaylogo": False}))
        first = False
        folder.write_bytes(f"png/{file_key(str(row['file']))}.png", png_figure(rows, str(row["file"]), float(row["duration_s"])))
    folder.write_bytes("timeline.html", page(summary, sections).encode())


def page(summary: pd.DataFrame, sections: list[str]) -> str:
    shown = summary[[c for c in ("file", "status", "duration_s", "speech_s", "segments", "EmoAct_mean",
                                 "EmoVal_mean", "EmoDom_mean") if c in summary]]
    cells = "".join(
        "<tr>" + "".join(f"<td class='num'>{v:.2f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
                         for v in record) + "</tr>" for record in shown.itertuples(index=False))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown.columns)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width, initial-scale=1'><title>mtser timeline</title><style>{STYLE}</style>"
            f"</head><body><h1>Emotion over time</h1><p class='note'>One bar per segment (as wide as the segment): "
            f"the ensemble's class probabilities; below, arousal, valence and dominance. Hover for times and the "
            f"transcript.</p><div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody>"
            f"</table></div>{''.join(sections)}</body></html>")
