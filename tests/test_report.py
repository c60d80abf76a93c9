"""`mtser report`: PNG panels and one self-contained, readable HTML page for a finished search."""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import matplotlib.colors
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.trainer import report

SIZES = {"confusion": (506, 572), "heatmap": (418, 506), "scatter": (396, 396), "curves": (330, 396)}  # px at 110 dpi


def wcag_contrast(a, b) -> float:
    """WCAG 2 contrast ratio, written out here independently of mtser's."""
    def luminance(rgb):
        c = np.asarray(matplotlib.colors.to_rgb(rgb))
        c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
    light, dark = sorted((luminance(a), luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


class Tables(HTMLParser):
    """The page's tables by id: header names and rows of (classes, text) cells."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.current = self.cell = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.current = self.tables.setdefault(attrs.get("id", f"t{len(self.tables)}"), {"head": [], "rows": []})
        elif tag == "tr" and self.current is not None:
            self.current["rows"].append([])
        elif tag in ("td", "th") and self.current is not None:
            self.cell = [tag, set((attrs.get("class") or "").split()), ""]

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[2] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            kind, classes, text = self.cell
            if kind == "th":
                self.current["head"].append((classes, text))
                self.current["rows"].pop() if self.current["rows"] == [[]] else None
            else:
                self.current["rows"][-1].append((classes, text))
            self.cell = None
        elif tag == "table":
            self.current = None

    def column(self, table: str, name: str) -> list[tuple[set, str]]:
        names = [text for _, text in self.tables[table]["head"]]
        return [row[names.index(name)] for row in self.tables[table]["rows"] if row]


def stage1_grid(values) -> pd.DataFrame:
    """A results table of one pooling's 3 × 3 α × β grid with the given f1 (and mean CCC) values."""
    alphas, betas = [0.25, 0.5, 1.0], [0.25, 0.5, 1.0]
    rows = [{"stage": 1, "alpha": a, "beta": b, "pooling": "asp", "f1": v, "ccc_mean": 1 - v}
            for (a, b), v in zip([(a, b) for a in alphas for b in betas], values)]
    return pd.DataFrame(rows)


def assert_labels_readable(panels) -> int:
    """Every cell label of every panel contrasts ≥ 4.5 : 1 with its cell (WCAG AA); returns the labels checked."""
    checked = set()
    for _, fig in panels:
        for ax in fig.axes:
            if not ax.images:
                continue                                         # a colour bar
            image = ax.images[0]
            values = np.asarray(image.get_array())
            for text in ax.texts:
                column, row = (round(c) for c in text.get_position())
                cell = image.to_rgba(values[row, column])
                ratio = wcag_contrast(cell, text.get_color())
                assert ratio >= 4.5, (ax.get_title(), row, column, text.get_text(), text.get_color(), ratio)
                checked.add(matplotlib.colors.to_hex(text.get_color()))
            assert len(ax.texts) == np.isfinite(values).sum()
        plt.close(fig)
    return len(checked)


def test_heatmap_and_confusion_labels_contrast_with_their_cells():
    panels = report.draw_heatmaps(stage1_grid(np.linspace(0.1, 0.5, 9)))      # viridis from dark purple to yellow
    assert [suffix for suffix, _ in panels] == ["asp-f1", "asp-ccc_mean"]
    assert assert_labels_readable(panels) == 2                                 # black on light cells, white on dark
    classes = list("ASHUFDCN")
    pred = pd.DataFrame({"true_EmoClass": classes * 3 + ["A"] * 6, "EmoClass": classes * 3 + ["S"] * 6})
    assert assert_labels_readable(report.draw_confusion(pred)) == 2


def test_text_colour_beats_white_on_yellow():
    yellow = matplotlib.colormaps["viridis"](1.0)
    assert wcag_contrast(yellow, "white") < 1.5                                # the old labels
    assert report.text_colour(yellow) == "black" and report.text_colour(matplotlib.colormaps["viridis"](0.0)) == "white"
    assert report.contrast_ratio((0, 0, 0), (1, 1, 1)) == pytest.approx(21.0)


def test_tables_right_align_fixed_precision_and_mark_the_best_per_column():
    frame = pd.DataFrame({"trial": ["a", "b", "c"], "alpha": [0.25, 0.5, 1.0], "best_epoch": [3.0, float("nan"), 12.0],
                          "f1": [0.31234, 0.31226, 0.2], "ccc_mean": [0.5, float("nan"), 0.7]})
    tables = Tables(report.html_table(frame, best=["f1", "ccc_mean"], table_id="x"))
    head = dict((text, classes) for classes, text in tables.tables["x"]["head"])
    assert "num" in head["f1"] and "num" in head["alpha"] and "num" not in head["trial"]
    assert [t for _, t in tables.column("x", "f1")] == ["0.3123", "0.3123", "0.2000"]
    assert [t for _, t in tables.column("x", "alpha")] == ["0.25", "0.50", "1.00"]
    assert [t for _, t in tables.column("x", "best_epoch")] == ["3", "–", "12"]
    assert all("num" in c for c, _ in tables.column("x", "f1") + tables.column("x", "ccc_mean"))
    assert ["best" in c for c, _ in tables.column("x", "f1")] == [True, True, False]      # equal at 4 decimals
    assert ["best" in c for c, _ in tables.column("x", "ccc_mean")] == [False, False, True]
    assert not any("best" in c for c, _ in tables.column("x", "alpha"))        # only the columns asked for
    assert "th.num,td.num{text-align:right" in report.STYLE and ".scroll{overflow-x:auto" in report.STYLE


def test_learning_curves_one_line_per_member_and_the_best_epoch_ringed():
    histories = {m: pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [3.0, 2.0, 1.5], "f1": [0.1, 0.3, 0.2],
                                  "ccc_mean": [0.2, 0.25, 0.4]}) for m in ("m1", "m2", "m3")}
    panels = report.draw_curves(histories, {"m1": 2, "m2": 3, "m3": 1})
    assert [suffix for suffix, _ in panels] == ["train_loss", "f1", "ccc_mean"]
    for suffix, fig in panels:
        ax = fig.axes[0]
        labelled = [line for line in ax.lines if not line.get_label().startswith("_")]
        assert [line.get_label() for line in labelled] == ["m1", "m2", "m3"]
        rings = [line for line in ax.lines if line.get_label().startswith("_")]
        assert len(rings) == (0 if suffix == "train_loss" else 3)
        if suffix == "f1":
            assert [float(r.get_xdata()[0]) for r in rings] == [2, 3, 1]
        plt.close(fig)


def test_report_writes_panels_and_a_readable_self_contained_page(search_run, demo_store, tmp_path):
    run, summary = search_run
    runner = CliRunner()
    assert runner.invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store)]).exit_code == 0
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    folder = run / "report"
    page = (folder / "index.html").read_text()
    pngs = sorted(folder.glob("*.png"))
    images = re.findall(r'<img alt="[^"]+" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(i) for i in images) == sorted(p.read_bytes() for p in pngs)  # the files, embedded
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page       # nothing external
    assert {p.stem.split("-")[0] for p in pngs} == set(SIZES)
    for png in pngs:                                                  # each panel: its size, and drawn on
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[:2] == SIZES[png.stem.split("-")[0]], png.name
        assert (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.05, f"{png.name} is nearly blank"
    # the heatmaps plot the search's stage-1 results: redrawn from the search summary they are the same pixels, and
    # other values give other pixels
    (tmp_path / "same").mkdir(), (tmp_path / "other").mkdir()
    redrawn = report.save_panels(report.draw_heatmaps(summary.table), tmp_path / "same", "heatmap")
    assert sorted(p.name for p in redrawn) == sorted(p.name for p in pngs if p.stem.startswith("heatmap"))
    for path in redrawn:
        np.testing.assert_array_equal(matplotlib.image.imread(path), matplotlib.image.imread(folder / path.name))
    shifted = summary.table.assign(f1=summary.table["f1"] + 0.05)
    other = report.save_panels(report.draw_heatmaps(shifted), tmp_path / "other", "heatmap")
    assert not np.array_equal(matplotlib.image.imread(other[0]), matplotlib.image.imread(redrawn[0]))

    results = summary.table
    for cohort, members in results.groupby("cohort"):                # one figure per cohort, with its members
        section = re.search(rf'<section class="cohort" data-cohort="{re.escape(cohort)}">(.*?)</section>', page, re.S)
        assert section, cohort
        legend = re.findall(r"</svg>([^<]+)</li>", section.group(1))
        assert legend == list(members["trial"])
        assert section.group(1).count("<img") == 3 == len(list(folder.glob(f"curves-{cohort}-*.png")))

    tables = Tables(page)
    settings = pd.read_csv(folder / "table1.csv")
    for metric in report.METRIC_COLUMNS:                              # the best of each Table 1 column is marked
        cells = tables.column("table1", metric)
        assert all("num" in classes and re.fullmatch(r"\d\.\d{4}", text) for classes, text in cells)
        marked = {text for classes, text in cells if "best" in classes}
        assert marked == {f"{settings[metric].max():.4f}"}, metric
    trials = [text for _, text in tables.column("trials", "trial")]
    assert trials == list(results["trial"])
    dev = json.loads((run / "ensemble" / "ensemble.json").read_text())["metrics"]["Development"]
    assert "ensemble metrics" in result.output and f"{dev['f1']:.4f}" in result.output


def test_report_of_a_folder_without_results_names_what_is_missing(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "results.csv" in result.output
