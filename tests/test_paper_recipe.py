"""configs/paper-final.yaml and configs/ablation.yaml end to end on the demo store, scaled down by `overrides`: the
search structure, stage-2 variants, the paper's ensembles (with an external member) and the Table-1 report."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.trainer.checkpoint import read_sidecar
from search_support import REPO, TINY


def scaled_down(name: str, folder: Path) -> Path:
    """The search file with the demo's small model (configs/demo.yaml) and TINY schedules; everything else kept."""
    search = yaml.safe_load((REPO / "configs" / name).read_text())
    paper_ensemble = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())["ensemble"]
    search.update(base=str(REPO / "configs" / "demo.yaml"), resources={"cpu": 1.0, "gpu": 0.0}, max_concurrent=2,
                  cohort_size=None, cohort_memory_gb=4.0)
    search["overrides"] = {"ensemble": paper_ensemble, **search.get("overrides", {}), **TINY,
                           "finetune.cat.min_lr": 1e-7}        # the paper's floor: the 1e-6 variant is below demo's
    path = folder / name
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    return path


def tune_and_report(name: str, store: str, folder: Path) -> tuple[Path, pd.DataFrame]:
    """`mtser tune` with the scaled-down search file, then `mtser report`: (run folder, results table)."""
    run = folder / "run"
    result = CliRunner().invoke(app, ["tune", "--search", str(scaled_down(name, folder)), "--store", store,
                                      "--out", str(run)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    return run, pd.read_csv(run / "results.csv")


def test_paper_final_runs_end_to_end(demo_store, tmp_path, ray_module):
    runner = CliRunner()
    run, table = tune_and_report("paper-final.yaml", str(demo_store), tmp_path)
    stage1 = table[table["stage"] == 1]
    assert stage1["trial"].tolist() == ["a0.25_b0.75_asp", "a0.75_b0.25_asp", "a0.75_b0.25_mean"]
    cat = table[table["task"] == "cat"]
    assert cat["trial"].tolist() == [f"cat-{v}__a0.25_b0.75_asp" for v in ("lr1e-5", "lr1e-6", "confusion")]
    assert cat["cohort"].nunique() == 1                                        # the lr variants share a cohort
    configs = [read_sidecar(Path(c))["config"] for c in cat["checkpoint"]]
    assert [c["finetune"]["cat"]["lr"] for c in configs] == [1e-5, 1e-6, 1e-5]
    assert [c["loss"]["class_weights"] for c in configs] == ["auto", "auto", "confusion"]
    losses = [pd.read_csv(Path(c).parent / "history.csv")["train_loss"].tolist() for c in cat["checkpoint"]]
    assert losses[2] != pytest.approx(losses[0])     # same lr, parent and batches: only the class weights differ
    dim = table[table["task"] == "dim"]
    assert sorted(dim["parent"].unique()) == ["a0.75_b0.25_asp", "a0.75_b0.25_mean"]   # per pooling, dim parents
    assert sorted(dim["sigma"].fillna(0).tolist()) == [0, 0, 3, 3, 5, 5, 7, 7]
    assert (table["status"] == "complete").all()

    dev = open_dev_ids(demo_store)
    pd.DataFrame({"FileName": dev, "EmoAct": 4.0, "EmoVal": 4.0, "EmoDom": 4.0}).to_csv(tmp_path / "baseline.csv",
                                                                                       index=False)
    result = runner.invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store),
                                 "--extra-member", f"arousal,dominance={tmp_path / 'baseline.csv'}"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((run / "ensemble" / "ensemble.json").read_text())
    members = manifest["members"]
    assert manifest["missing_external"] == {} and "ensemble.external" not in result.output   # the baseline given
    trials = {task: [m["trial"] for m in ms] for task, ms in members.items()}
    assert len(trials["class"]) == 1 and trials["class"][0].startswith("cat-")
    for name in ("arousal", "dominance"):                                     # 3 Task-2 models + the baseline
        assert all(t.startswith("dim_") for t in trials[name][:3]) and trials[name][3] == "external:baseline.csv"
    assert all(t.startswith("dim_") for t in trials["valence"][:3])
    assert trials["valence"][3] == "a0.75_b0.25_asp"           # + the ASP Task-2 parent, whatever its valence CCC
    assert "challenge" in result.output
    settings = pd.read_csv(run / "report" / "table1.csv")
    assert settings["split"].unique().tolist() == ["Development (selection)"] and len(settings) == 3


def open_dev_ids(store: str) -> list[str]:
    from mtser.featurestore.store import open_store
    from mtser.trainer.data import evaluation_ids

    opened = open_store(store)
    return evaluation_ids(opened, sorted(opened.encoders), "Development")


def test_ablation_renders_table_1(demo_store, tmp_path, ray_module):
    run, table = tune_and_report("ablation.yaml", str(demo_store), tmp_path)
    assert (table["stage"] == 1).all() and len(table) == 5                     # stage 1 only
    settings = pd.read_csv(run / "report" / "table1.csv")
    assert settings["setting"].tolist() == ["single-task: attributes", "single-task: classes", "multi-task",
                                            "multi-task", "multi-task"]
    assert list(zip(settings["alpha"], settings["beta"])) == [(1, 0), (0, 1), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25)]
    assert (settings["split"] == "Development (test)").all()
    for _, row in table.iterrows():                  # the table shows each setting's test metrics on Development
        meta = read_sidecar(Path(row["checkpoint"]))
        assert meta["selection_split"].startswith("Train held out (0.1 by speaker")
        assert meta["config"]["train"]["use_augmented"] is False
        shown = settings[(settings["alpha"] == row["alpha"]) & (settings["beta"] == row["beta"])].iloc[0]
        for metric in ("f1", "ccc_arousal", "ccc_valence", "ccc_dominance", "ccc_mean"):
            assert shown[metric] == pytest.approx(meta["test_metrics"][metric], abs=1e-4)
    page = (run / "report" / "index.html").read_text()
    assert 'id="table1"' in page and "single-task: classes" in page
