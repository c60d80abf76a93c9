"""`mtser tune`: a two-stage Ray Tune search on the demo store, best-checkpoint bookkeeping, resume, ASHA."""
from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.configio import ConfigError
from mtser.trainer.checkpoint import read_sidecar
from mtser.trainer.runs import RESULT_COLUMNS
from mtser.trainer.grid import group_cohorts, stage1_specs, stage2_specs
from mtser.trainer.search_config import TrialResources
from mtser.trainer.tune import prepare_run, run_search, trial_resources
from search_support import REPO, TINY, ray_init, write_grid


def _states(run: Path, stage: int = 1) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run / f"stage{stage}").glob("*/state.json"))}


def test_interrupted_search_resumed_runs_only_the_unfinished_cohorts(demo_store, tmp_path):
    alphas = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]                  # 3 cohorts of 2, one at a time
    # 6 epochs a cohort: a cohort of the tiny recipe's 2 epochs trains in about a second, so on an idle machine the
    # last cohorts could finish between two polls and the interrupt would come after the search had ended
    grid = write_grid(tmp_path / "grid.yaml", alpha=alphas, pooling=["asp"], cohort_size=2, max_concurrent=1,
                      overrides={**TINY, "train.epochs": 6})
    run = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "mtser", "tune", "--search", str(grid), "--store", str(demo_store),
                             "--out", str(run), "--stage", "1"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(s.get("status") == "complete" for s in _states(run).values()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"search ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr[-2000:]
    assert "interrupted" in stderr and "--resume" in stderr

    before = _states(run)
    finished = {name for name, s in before.items() if s["status"] == "complete"}
    cohorts = {before[name]["cohort"] for name in finished}
    assert 2 <= len(finished) < 6 and len(finished) == 2 * len(cohorts)      # whole cohorts finish together
    mtimes = {name: (run / "stage1" / name / "state.json").stat().st_mtime_ns for name in finished}

    ray_init()
    summary = run_search(grid, str(demo_store), run, resume=True, stages=(1,), verbose=0)
    all_points = {f"a{a:g}_b1_asp" for a in alphas}
    assert set(summary.ran) == all_points - finished
    assert len(summary.cohorts) == math.ceil(len(summary.ran) / 2)
    assert summary.failed == []
    assert {name: (run / "stage1" / name / "state.json").stat().st_mtime_ns for name in finished} == mtimes
    assert (summary.table["status"] == "complete").all() and len(summary.table) == 6

    again = run_search(grid, str(demo_store), run, resume=True, stages=(1,), verbose=0)
    assert again.ran == []


def test_two_stage_search_keeps_each_trials_best_checkpoint(search_run):
    run, summary = search_run
    table = summary.table
    assert summary.failed == []
    assert list(table.columns) == RESULT_COLUMNS
    assert len(table) == 6 and (table["status"] == "complete").all()
    assert table["stage"].tolist() == [1, 1, 1, 1, 2, 2]

    stage1 = table[table["stage"] == 1].set_index("trial")
    cat = table[table["task"] == "cat"].iloc[0]
    dim = table[table["task"] == "dim"].iloc[0]
    assert stage1.loc[cat["parent"], "f1"] == stage1["f1"].max()
    assert stage1.loc[dim["parent"], "ccc_mean"] == stage1[stage1["pooling"] == "asp"]["ccc_mean"].max()
    assert dim["sigma"] == 3.0 and pd.isna(cat["sigma"])
    assert cat["checkpoint"] != stage1.loc[cat["parent"], "checkpoint"]

    for _, row in table.iterrows():
        meta = read_sidecar(Path(row["checkpoint"]))
        history = pd.read_csv(Path(row["checkpoint"]).parent / "history.csv")
        metric = {"multi": "score", "cat": "f1", "dim": "ccc_mean"}[row["task"]]
        assert meta["epoch"] == row["best_epoch"] == int(history.loc[history[metric].idxmax(), "epoch"])
        assert meta["metrics"]["f1"] == pytest.approx(row["f1"])
        assert meta["metrics"]["ccc_mean"] == pytest.approx(row["ccc_mean"])
        if row["stage"] == 2:
            assert meta["parent"] == stage1.loc[row["parent"], "checkpoint"]

    on_disk = pd.read_csv(run / "results.csv")
    assert on_disk["trial"].tolist() == table["trial"].tolist()
    assert on_disk["f1"].tolist() == pytest.approx(table["f1"].tolist())
    assert table["cohort"].tolist() == ["asp-c0", "asp-c0", "mean-c0", "mean-c0",
                                        f"cat__{cat['parent']}-c0", f"dim__{dim['parent']}-c0"]
    assert cat["trial"] == f"cat-base__{cat['parent']}"
    events = {p.parent.name for p in (run / "ray").glob("stage*-*/*/events.out.tfevents*")}
    assert events == set(table["cohort"])                    # Ray Tune's TensorBoard logs, one per cohort (trial)


def test_asha_stopped_trials_count_as_finished(demo_store, tmp_path, ray_module):
    grid = write_grid(tmp_path / "grid.yaml", asha={"grace_period": 1, "reduction_factor": 2}, max_concurrent=0)
    summary = run_search(grid, str(demo_store), tmp_path / "run", stages=(1,), verbose=0)
    statuses = summary.table.set_index("trial")["status"]
    assert set(statuses) <= {"complete", "stopped"} and "stopped" in set(statuses)
    assert statuses.notna().all() and summary.table["checkpoint"].notna().all()
    resumed = run_search(grid, str(demo_store), tmp_path / "run", resume=True, stages=(1,), verbose=0)
    assert resumed.ran == []


def test_stage2_specs_pick_parents_by_task_metric(tmp_path):
    from mtser.configio import load_yaml_as
    from mtser.trainer.search_config import SearchConfig

    search = load_yaml_as(write_grid(tmp_path / "grid.yaml", sigma=[None, 5.0], dim_parents=2), SearchConfig)
    stage1 = pd.DataFrame({
        "trial": ["p", "q", "r", "s"], "alpha": [1.0, 0.5, 1.0, 0.5], "beta": [1.0] * 4,
        "pooling": ["asp", "asp", "mean", "mean"], "status": ["complete", "complete", "stopped", "failed"],
        "f1": [0.30, 0.35, 0.10, 0.99], "ccc_mean": [0.20, 0.10, 0.50, 0.99],
        "checkpoint": ["/c/p", "/c/q", "/c/r", None]})
    specs = stage2_specs(search, REPO / "configs" / "demo.yaml", "cpu", stage1)
    assert [(s.name, s.task, s.sigma, s.init_from) for s in specs] == [
        ("cat-base__q", "cat", None, "/c/q"),
        ("dim_mse__r", "dim", None, "/c/r"), ("dim_s5__r", "dim", 5.0, "/c/r"),
        ("dim_mse__p", "dim", None, "/c/p"), ("dim_s5__p", "dim", 5.0, "/c/p")]
    assert specs[0].schedule.select_metric == "f1" and specs[0].config.model.pooling == "asp"
    assert specs[2].config.loss.sigma == 5.0 and specs[2].schedule.select_metric == "ccc_mean"
    assert specs[1].config.model.pooling == "mean" and specs[1].schedule.task == "dim"


def test_stage2_runs_the_papers_variants_and_parents_per_pooling(tmp_path):
    """cat_variants become members with their own lr / class weights; dim parents are the best per pooling,
    among the points whose parent_for allows it."""
    from mtser.configio import load_yaml_as
    from mtser.trainer.search_config import SearchConfig

    points = [{"alpha": 0.5, "beta": 1.0, "pooling": "asp", "parent_for": ["cat"]},
              {"alpha": 1.0, "beta": 1.0, "pooling": "asp", "parent_for": ["dim"]},
              {"alpha": 0.5, "beta": 1.0, "pooling": "mean"},
              {"alpha": 1.0, "beta": 1.0, "pooling": "mean", "parent_for": ["cat"]}]
    variants = {"lr1e-5": {"finetune.cat.lr": 1e-5}, "lr1e-6": {"finetune.cat.lr": 1e-6},
                "confusion": {"finetune.cat.lr": 1e-5, "loss.class_weights": "confusion"}}
    search = load_yaml_as(write_grid(tmp_path / "grid.yaml", alpha=[], beta=[], pooling=[], points=points,
                                     cat_variants=variants, dim_parents={"asp": 1, "mean": 1}, sigma=[3.0, None],
                                     overrides={**TINY, "finetune.cat.min_lr": 1e-7}),
                          SearchConfig)
    names = ["a0.5_b1_asp", "a1_b1_asp", "a0.5_b1_mean", "a1_b1_mean"]
    stage1 = pd.DataFrame({"trial": names, "alpha": [0.5, 1.0, 0.5, 1.0], "beta": [1.0] * 4,
                           "pooling": ["asp", "asp", "mean", "mean"], "status": ["complete"] * 4,
                           "f1": [0.3, 0.4, 0.1, 0.2], "ccc_mean": [0.9, 0.2, 0.1, 0.8],
                           "checkpoint": [f"/c/{n}" for n in names]})
    specs = stage2_specs(search, REPO / "configs" / "demo.yaml", "cpu", stage1)
    # cat: the best by F1 among the cat-allowed points (a1_b1_asp has a higher F1 but is a dim parent only)
    cat = [s for s in specs if s.task == "cat"]
    assert [s.name for s in cat] == ["cat-lr1e-5__a0.5_b1_asp", "cat-lr1e-6__a0.5_b1_asp", "cat-confusion__a0.5_b1_asp"]
    assert [s.schedule.lr for s in cat] == [1e-5, 1e-6, 1e-5]
    assert [s.schedule.epochs for s in cat] == [2, 2, 2]                 # TINY's finetune.cat.epochs
    assert [s.config.loss.class_weights for s in cat] == ["auto", "auto", "confusion"]
    # dim: the best ASP and the best mean point by mean CCC that may be dim parents (the cat-only points score
    # higher), each with every sigma
    dim = [(s.name, s.sigma, s.schedule.select_metric) for s in specs if s.task == "dim"]
    assert dim == [("dim_s3__a1_b1_asp", 3.0, "ccc_mean"), ("dim_mse__a1_b1_asp", None, "ccc_mean"),
                   ("dim_s3__a0.5_b1_mean", 3.0, "ccc_mean"), ("dim_mse__a0.5_b1_mean", None, "ccc_mean")]
    cohorts = group_cohorts(specs, lambda s: 8)     # the lr variants share one cohort (lr is per member)
    assert [(c.name, len(c.members)) for c in cohorts] == [("cat__a0.5_b1_asp-c0", 3), ("dim__a1_b1_asp-c0", 2),
                                                           ("dim__a0.5_b1_mean-c0", 2)]


def test_grid_points_group_into_cohorts_by_architecture_schedule_and_parent(demo_store, tmp_path):
    from mtser.configio import load_yaml_as
    from mtser.featurestore.store import open_store
    from mtser.trainer.search_config import SearchConfig
    from mtser.trainer.search_plan import auto_cohort_size

    search = load_yaml_as(write_grid(tmp_path / "grid.yaml", alpha=[0.25, 0.5, 1.0], beta=[0.5, 1.0]), SearchConfig)
    base = REPO / "configs" / "demo.yaml"
    specs = stage1_specs(search, base, "cpu")
    cohorts = group_cohorts(specs, lambda s: 4)
    assert [(c.name, [m.name for m in c.members]) for c in cohorts] == [
        ("asp-c0", ["a0.25_b0.5_asp", "a0.25_b1_asp", "a0.5_b0.5_asp", "a0.5_b1_asp"]),
        ("asp-c1", ["a1_b0.5_asp", "a1_b1_asp"]),
        ("mean-c0", ["a0.25_b0.5_mean", "a0.25_b1_mean", "a0.5_b0.5_mean", "a0.5_b1_mean"]),
        ("mean-c1", ["a1_b0.5_mean", "a1_b1_mean"])]
    stage1 = pd.DataFrame({"trial": ["p", "q"], "alpha": [1.0, 0.5], "beta": [1.0, 1.0], "pooling": ["asp", "mean"],
                           "status": ["complete", "complete"], "f1": [0.3, 0.2], "ccc_mean": [0.1, 0.5],
                           "checkpoint": ["/c/p", "/c/q"]})
    search.sigma, search.dim_parents = [None, 3.0, 5.0], 2
    stage2 = group_cohorts(stage2_specs(search, base, "cpu", stage1), lambda s: 8)
    assert [(c.name, len(c.members)) for c in stage2] == [("cat__p-c0", 1), ("dim__q-c0", 3), ("dim__p-c0", 3)]
    store = open_store(demo_store)
    one = auto_cohort_size(specs[0], store, memory_gb=1.0)
    assert auto_cohort_size(specs[0], store, memory_gb=4.0) in (4 * one, 4 * one + 1, 4 * one + 2, 4 * one + 3)
    assert auto_cohort_size(specs[0], store, memory_gb=1e-6) == 1


def test_layer_axes_make_distinct_stable_point_names_and_separate_cohorts(tmp_path):
    """model.layer_weights and model.layers as grid axes: one readable, filesystem-safe name per point (the same
    whatever the order of the encoders in a mapping), one cohort per architecture, stage 2 inherits the parent's."""
    from mtser.configio import load_yaml_as
    from mtser.trainer.search_config import SearchConfig

    base = REPO / "configs" / "demo.yaml"
    axes = {"model.layer_weights": [True], "model.layers": [None, {"whisper": [1], "wavlm": [0, 2]}, {"wavlm": [2]}]}
    search = load_yaml_as(write_grid(tmp_path / "grid.yaml", alpha=[0.5, 1.0], beta=[1.0], pooling=["asp"],
                                     axes=axes), SearchConfig)
    specs = stage1_specs(search, base, "cpu")
    tags = ["lw=on_layers=all", "lw=on_layers=wavlm.0-2_whisper.1", "lw=on_layers=wavlm.2"]
    assert [s.name for s in specs] == [f"a{a}_b1_asp_{t}" for t in tags for a in ("0.5", "1")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.=-]+", s.name) for s in specs)
    assert [s.config.model.layers for s in specs[::2]] == [None, {"whisper": [1], "wavlm": [0, 2]}, {"wavlm": [2]}]
    assert all(s.config.model.layer_weights for s in specs)
    reordered = {**axes, "model.layers": [None, {"wavlm": [0, 2], "whisper": [1]}, {"wavlm": [2]}]}
    again = load_yaml_as(write_grid(tmp_path / "again.yaml", alpha=[0.5, 1.0], beta=[1.0], pooling=["asp"],
                                    axes=reordered), SearchConfig)
    assert [s.name for s in stage1_specs(again, base, "cpu")] == [s.name for s in specs]
    cohorts = group_cohorts(specs, lambda s: 8)                    # α and β share a cohort, the layers do not
    assert [(c.name, [m.name for m in c.members]) for c in cohorts] == [
        (f"asp_{t}-c0", [f"a0.5_b1_asp_{t}", f"a1_b1_asp_{t}"]) for t in tags]

    plain = load_yaml_as(write_grid(tmp_path / "plain.yaml", alpha=[], beta=[], pooling=[], points=[
        {"alpha": 1.0, "beta": 1.0, "axes": {"model.layers": {"wavlm": [2]}}},
        {"alpha": 1.0, "beta": 1.0, "axes": {"model.layers": {"wavlm": [1]}}},
        {"alpha": 1.0, "beta": 1.0}], axes={"model.layer_weights": [False]}), SearchConfig)
    specs = stage1_specs(plain, base, "cpu")
    assert [s.name for s in specs] == ["a1_b1_asp_lw=off_layers=wavlm.2", "a1_b1_asp_lw=off_layers=wavlm.1",
                                       "a1_b1_asp_lw=off"]
    assert [len(c.members) for c in group_cohorts(specs, lambda s: 8)] == [1, 1, 1]
    stage1 = pd.DataFrame({"trial": [s.name for s in specs], "alpha": [1.0] * 3, "beta": [1.0] * 3,
                           "pooling": ["asp"] * 3, "status": ["complete"] * 3, "f1": [0.1, 0.3, 0.2],
                           "ccc_mean": [0.5, 0.1, 0.2], "checkpoint": [f"/c/{s.name}" for s in specs]})
    plain.dim_parents, plain.sigma = 1, [None]
    stage2 = stage2_specs(plain, base, "cpu", stage1)
    assert [(s.name, s.config.model.layers, s.config.model.layer_weights) for s in stage2] == [
        ("cat-base__a1_b1_asp_lw=off_layers=wavlm.1", {"wavlm": [1]}, False),
        ("dim_mse__a1_b1_asp_lw=off_layers=wavlm.2", {"wavlm": [2]}, False)]

    several = load_yaml_as(write_grid(tmp_path / "several.yaml", axes={"model.layers": [{"wavlm": [0, 2]}]}),
                           SearchConfig)
    with pytest.raises(ConfigError, match=r"grid point a0\.5_b1_asp_layers=wavlm\.0-2: .*model\.layers\.wavlm: .*"
                                          r"layer_weights"):                 # several layers need the learned mix
        stage1_specs(several, base, "cpu")


@pytest.mark.parametrize("changes, message", [
    ({"axes": {"model.pooling": ["asp"]}}, "axes.model.pooling: not a grid axis (the axes: model.layer_weights, "
                                          "model.layers)"),
    ({"axes": {"model.layers": []}}, "axes.model.layers: must list at least one value"),
    ({"axes": {"model.layer_weights": ["yes"]}}, "axes.model.layer_weights[0]: expected true or false"),
    ({"axes": {"model.layers": [{"wavlm": [-1]}]}}, "axes.model.layers[0]: expected null (all stored layers) or a "
                                                   "mapping encoder -> [hidden-state indices >= 0]"),
    ({"axes": {"model.layers": [{"wav/lm": [1]}]}}, "axes.model.layers[0]: expected null"),
    ({"axes": {"model.layers": [{"wavlm": [1]}, {"wavlm": [1]}]}}, "stage-1 points share the name "
                                                                  "a0.5_b1_asp_layers=wavlm.1"),
    ({"alpha": [], "beta": [], "pooling": [], "points": [{"alpha": 1, "beta": 1, "axes": {"model.layers": None}}],
      "axes": {"model.layers": [None]}}, "axes: model.layers: set by listed points and varied by axes"),
    ({"alpha": [], "beta": [], "pooling": [], "points": [{"alpha": 1, "beta": 1, "axes": {"train.lr": 1}}]},
     "points[0].axes.train.lr: not a grid axis"),
])
def test_bad_grid_axes_name_the_key(tmp_path, changes, message):
    from mtser.configio import load_yaml_as
    from mtser.trainer.search_config import SearchConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_yaml_as(write_grid(tmp_path / "grid.yaml", **changes), SearchConfig)


def test_cli_refuses_to_overwrite_or_change_a_run(demo_store, tmp_path):
    grid = write_grid(tmp_path / "grid.yaml")
    prepare_run(grid, str(Path(demo_store).resolve()), tmp_path / "run", resume=False)
    runner = CliRunner()
    args = ["tune", "--search", str(grid), "--store", str(demo_store), "--out", str(tmp_path / "run")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--resume" in result.output
    other = write_grid(tmp_path / "other.yaml", alpha=[0.25])
    result = runner.invoke(app, ["tune", "--search", str(other), "--store", str(demo_store),
                                 "--out", str(tmp_path / "run"), "--resume"])
    assert result.exit_code == 2 and "different search" in result.output
    result = runner.invoke(app, ["tune", "--search", str(grid), "--store", str(tmp_path / "nowhere"),
                                 "--out", str(tmp_path / "run2")])
    assert result.exit_code == 2 and "nowhere" in result.output


def test_gpu_share_is_requested_only_where_gpus_exist():
    assert trial_resources(TrialResources(cpu=0.5, gpu=0.25), cluster_gpus=0.0) == {"cpu": 0.5, "gpu": 0.0}
    assert trial_resources(TrialResources(cpu=0.5, gpu=0.25), cluster_gpus=2.0) == {"cpu": 0.5, "gpu": 0.25}
