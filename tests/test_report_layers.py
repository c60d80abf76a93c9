"""Learned layer weights in the results table (`layer_entropy`) and the report (one heatmap per encoder), read from
hand-made checkpoints: a safetensors state dict with `branches.<enc>.mix.logits` and the sidecar's `layers`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from mtser.trainer import report_layers
from mtser.trainer.report import write_report
from mtser.trainer.runs import RESULTS, RunFolder, mark_state, results_table


def layered_checkpoint(path: Path, logits: dict[str, list[float]], layers: dict[str, list[int]] | None,
                       dtype: torch.dtype = torch.float32) -> str:
    """A checkpoint folder as checkpoint.py writes it: other weights around the layer logits, sidecar `layers`."""
    path.mkdir(parents=True)
    state = {"head.weight": torch.randn(5, 3), "branches.wavlm.proj.weight": torch.randn(4, 8),
             **{f"branches.{enc}.mix.logits": torch.tensor(v, dtype=dtype) for enc, v in logits.items()}}
    save_file(state, str(path / "model.safetensors"))
    (path / "checkpoint.json").write_text(json.dumps({"format": "mtser-checkpoint", "version": 1,
                                                      **({"layers": layers} if layers is not None else {})}))
    return str(path)


def softmax(v) -> np.ndarray:
    e = np.exp(np.asarray(v, dtype=float) - max(v))
    return e / e.sum()


def test_entropy_of_uniform_and_peaked_weights(tmp_path):
    uniform = layered_checkpoint(tmp_path / "u", {"wavlm": [0.0] * 4, "whisper": [0.0] * 3},
                                 {"wavlm": [0, 1, 2, 3], "whisper": [0, 1, 2]})
    assert report_layers.checkpoint_layer_entropy(uniform) == pytest.approx((math.log(4) + math.log(3)) / 2)
    peaked = layered_checkpoint(tmp_path / "p", {"wavlm": [2.0, -1.0, 0.5]}, {"wavlm": [0, 6, 12]},
                                dtype=torch.bfloat16)
    w = softmax([2.0, -1.0, 0.5])                    # bfloat16 holds these logits exactly
    assert report_layers.checkpoint_layer_entropy(peaked) == pytest.approx(float(-(w * np.log(w)).sum()))
    assert report_layers.layer_entropy({"wavlm": np.array([50.0, 0.0])}) == pytest.approx(0.0, abs=1e-12)
    weights = report_layers.member_weights(peaked)
    assert weights["wavlm"][0] == [0, 6, 12]
    np.testing.assert_allclose(weights["wavlm"][1], w)
    plain = layered_checkpoint(tmp_path / "n", {}, None)
    assert math.isnan(report_layers.checkpoint_layer_entropy(plain)) and report_layers.member_weights(plain) == {}
    assert math.isnan(report_layers.checkpoint_layer_entropy(None))
    assert math.isnan(report_layers.checkpoint_layer_entropy(str(tmp_path / "missing")))


def test_heatmap_plots_each_members_softmax_weights(tmp_path):
    members = {"a1_b1_asp · multi": {"wavlm": ([0, 6, 12], softmax([1.0, 0.0, -1.0]))},
               "dim_s3__a1_b1_asp · dim → valence": {"wavlm": ([6, 12, 24], softmax([0.0, 2.0, 0.0])),
                                                      "whisper": ([2], np.ones(1))}}
    panels = report_layers.draw_layer_weights(members)
    assert [suffix for suffix, _ in panels] == ["wavlm", "whisper"]
    ax = panels[0][1].axes[0]
    plotted = np.asarray(ax.images[0].get_array().filled(np.nan))
    expected = np.array([[*softmax([1.0, 0.0, -1.0]), np.nan], [np.nan, *softmax([0.0, 2.0, 0.0])]])
    np.testing.assert_allclose(plotted, expected)                # columns: the union of stored indices 0, 6, 12, 24
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "6", "12", "24"]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(members)
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in expected[np.isfinite(expected)])
    assert ax.images[0].get_cmap().name == "cividis"
    for _, fig in panels:
        plt.close(fig)
    assert report_layers.draw_layer_weights({}) == []


def test_results_table_and_report_show_the_layer_weights(tmp_path):
    run = RunFolder(tmp_path / "run")
    logits = {"wavlm": [0.5, 0.0, -0.5, 1.0]}
    points = [{"stage": 1, "name": n, "alpha": 1.0, "beta": 1.0, "pooling": "asp", "sigma": None, "task": "multi",
               "parent": None} for n in ("a1_b1_asp_lw=on", "a1_b1_asp_lw=off")]
    layered = layered_checkpoint(tmp_path / "run" / "stage1" / points[0]["name"] / "best", logits,
                                 {"wavlm": [0, 4, 8, 12]})
    plain = layered_checkpoint(tmp_path / "run" / "stage1" / points[1]["name"] / "best", {}, None)
    for point, checkpoint in zip(points, (layered, plain)):
        mark_state(run, 1, point["name"], status="complete", cohort=point["name"], best_epoch=1,
                   best_metrics={"f1": 0.3, "ccc_mean": 0.2}, checkpoint=checkpoint)
    table = results_table(run, points)
    w = softmax(logits["wavlm"])
    assert table["layer_entropy"].iloc[0] == pytest.approx(float(-(w * np.log(w)).sum()))
    assert math.isnan(table["layer_entropy"].iloc[1])
    assert table["axes"].tolist() == ["", ""]                     # points of a search without grid axes
    run.write_csv(RESULTS, table)
    (tmp_path / "run" / "ensemble").mkdir()
    (tmp_path / "run" / "ensemble" / "ensemble.json").write_text(json.dumps(
        {"members": {"class": [{"trial": points[0]["name"]}], "valence": [{"trial": points[0]["name"]}]}}))

    page = Path(write_report(run.url)).read_text()
    png = tmp_path / "run" / "report" / "layers-wavlm.png"
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] == int(110 * (1.4 + 0.36))             # one member row at 110 dpi
    assert 462 <= pixels.shape[1] <= 1100                         # 4 layer columns and the member's long label
    assert (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.05
    assert '<h2 id="layers">Layer weights</h2>' in page and "1 member with learned layer weights" in page
    assert "layer_<wbr>entropy" in page                           # the trials table's column
    redrawn = report_layers.draw_layer_weights(report_layers.run_layer_weights(run, pd.read_csv(run.url_of(RESULTS))))
    labels = [t.get_text() for t in redrawn[0][1].axes[0].get_yticklabels()]
    assert labels == ["a1_b1_asp_lw=on · multi → class, valence"]
    plt.close(redrawn[0][1])

    run.write_csv(RESULTS, table.iloc[1:])                        # no member with layer weights: no section
    page = Path(write_report(run.url, tmp_path / "plain")).read_text()
    assert 'id="layers"' not in page and not list((tmp_path / "plain").glob("layers*"))
    assert "layer_<wbr>entropy" not in page


def test_points_of_other_grid_axes_get_their_own_heatmaps_and_table1_rows():
    from mtser.trainer import report

    rows = [{"stage": 1, "trial": f"a{a:g}_b1_asp{'_' + axes if axes else ''}", "alpha": a, "beta": 1.0,
             "pooling": "asp", "axes": axes, "f1": f1, "ccc_mean": f1 / 2}
            for axes, f1s in (("", (0.1, 0.2)), ("lw=on_layers=all", (0.3, 0.4))) for a, f1 in zip((0.5, 1.0), f1s)]
    results = pd.DataFrame(rows).replace({"axes": {"": None}})              # as results.csv reads back
    panels = report.draw_heatmaps(results)
    assert [suffix for suffix, _ in panels] == ["asp-f1", "asp-ccc_mean", "asp_lw=on_layers=all-f1",
                                                "asp_lw=on_layers=all-ccc_mean"]
    plotted = [np.asarray(fig.axes[0].images[0].get_array()).ravel().tolist() for _, fig in panels[::2]]
    assert plotted == [[0.1, 0.2], [0.3, 0.4]]                              # not averaged across the axes
    for _, fig in panels:
        plt.close(fig)
    others = {c: math.nan for c in [*report.METRIC_COLUMNS, *report.TEST_COLUMNS] if c not in results}
    settings = report.table1(results.assign(**others))
    assert sorted(zip(settings["pooling"], settings["f1"])) == [("asp", 0.1), ("asp", 0.2),
                                                                ("asp_lw=on_layers=all", 0.3),
                                                                ("asp_lw=on_layers=all", 0.4)]
