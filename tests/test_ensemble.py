"""`mtser ensemble`: member choice, metrics equal to an independent recomputation, challenge CSVs, manifest."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.featurestore.labels import ATTRIBUTE_COLUMNS, ATTRIBUTES, CLASSES
from mtser.featurestore.store import open_store
from mtser.trainer.data import evaluation_ids
from mtser.trainer.ensemble import EnsembleError, select_members
from mtser.trainer.infer import evaluate
from search_support import ray_module, search_run  # noqa: F401 (fixtures)


@pytest.fixture
def dev_ensemble(search_run, demo_store):
    run, _ = search_run
    result = CliRunner().invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store)])
    assert result.exit_code == 0, result.output
    return run, json.loads((run / "ensemble" / "ensemble.json").read_text()), result.output


def _ccc(t: np.ndarray, p: np.ndarray) -> float:
    return 2 * np.cov(t, p, bias=True)[0, 1] / (t.var() + p.var() + (t.mean() - p.mean()) ** 2)


def test_ensemble_metrics_equal_recomputation_from_members(dev_ensemble, demo_store):
    run, manifest, output = dev_ensemble
    members = manifest["members"]
    assert manifest["k"] == 2 and all(len(members[t]) == 2 for t in ("class", *ATTRIBUTES))
    results = pd.read_csv(run / "results.csv")
    for task in ("class", *ATTRIBUTES):
        metric = "f1" if task == "class" else f"ccc_{task}"
        best = results.sort_values([metric, "trial"], ascending=[False, True]).head(2)
        assert [m["trial"] for m in members[task]] == best["trial"].tolist()
        assert [m["dev_metric"] for m in members[task]] == pytest.approx(best[metric].tolist())

    tables = {}
    for m in [m for ms in members.values() for m in ms]:        # independent path: loop.evaluate per member
        _, tables[m["checkpoint"]] = evaluate(m["checkpoint"], str(demo_store), "Development", device="cpu")
    first = next(iter(tables.values()))
    probs = np.mean([tables[m["checkpoint"]][[f"prob_{c}" for c in CLASSES]].to_numpy() for m in members["class"]], 0)
    has_class = first["true_EmoClass"].notna().to_numpy()
    truth = first["true_EmoClass"][has_class].map(CLASSES.index).to_numpy()
    expected = {"f1": f1_score(truth, probs[has_class].argmax(1), labels=range(8), average="macro", zero_division=0)}
    for name in ATTRIBUTES:
        column = ATTRIBUTE_COLUMNS[name]
        mean = np.mean([tables[m["checkpoint"]][column].to_numpy() for m in members[name]], axis=0)
        known = first[f"true_{column}"].notna().to_numpy()
        expected[f"ccc_{name}"] = _ccc(first[f"true_{column}"].to_numpy()[known], mean[known])
    expected["ccc_mean"] = np.mean([expected[f"ccc_{n}"] for n in ATTRIBUTES])
    got = manifest["metrics"]["Development"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert "ENSEMBLE" in output and f"{got['f1']:.4f}" in output
    for m in members["class"]:                                   # each member's own metric is printed too
        assert f"{manifest['member_metrics']['Development'][m['trial']]['f1']:.4f}" in output


def test_challenge_csvs_have_exact_headers_and_rows(dev_ensemble, demo_store, search_run):
    run, manifest, _ = dev_ensemble
    store = open_store(str(demo_store))
    encoders = sorted(store.encoders)
    dev_ids = sorted(evaluation_ids(store, encoders, "Development"))
    folder = run / "ensemble" / "Development"
    categorical = pd.read_csv(folder / "categorical.csv")
    attributes = pd.read_csv(folder / "attributes.csv")
    assert list(categorical.columns) == ["FileName", "EmoClass"]
    assert list(attributes.columns) == ["FileName", "EmoAct", "EmoVal", "EmoDom"]
    assert categorical["FileName"].tolist() == attributes["FileName"].tolist() == dev_ids
    assert set(categorical["EmoClass"]) <= set(CLASSES)
    assert attributes[["EmoAct", "EmoVal", "EmoDom"]].stack().between(1, 7).all()

    result = CliRunner().invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store), "--split", "Test3"])
    assert result.exit_code == 0, result.output
    assert "no labels" in result.output
    test_ids = sorted(evaluation_ids(store, encoders, "Test3"))
    assert len(test_ids) > 0
    assert pd.read_csv(run / "ensemble" / "Test3" / "categorical.csv")["FileName"].tolist() == test_ids
    assert pd.read_csv(run / "ensemble" / "Test3" / "attributes.csv")["FileName"].tolist() == test_ids
    both = json.loads((run / "ensemble" / "ensemble.json").read_text())
    assert set(both["metrics"]) == {"Development", "Test3"} and both["metrics"]["Test3"] == {}
    assert both["store_provenance"]["encoders"].keys() == store.encoders.keys()

    bad = CliRunner().invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store), "--split", "Dev"])
    assert bad.exit_code == 2 and "Dev" in bad.output


def test_select_members_ranks_per_task_and_skips_unfinished():
    results = pd.DataFrame({
        "stage": [1, 2, 2, 1], "trial": ["a", "b", "c", "d"], "status": ["complete", "stopped", "complete", "failed"],
        "checkpoint": ["/a", "/b", "/c", None], "f1": [0.2, 0.4, 0.3, 0.9],
        "ccc_arousal": [0.5, 0.1, 0.4, 0.9], "ccc_valence": [0.1, 0.2, 0.3, 0.9], "ccc_dominance": [0.3, 0.3, 0.1, 0.9]})
    chosen = select_members(results, 2)
    assert [m["trial"] for m in chosen["class"]] == ["b", "c"]
    assert [m["trial"] for m in chosen["arousal"]] == ["a", "c"]
    assert [m["trial"] for m in chosen["valence"]] == ["c", "b"]
    assert [m["trial"] for m in chosen["dominance"]] == ["a", "b"]    # tie broken by trial name
    with pytest.raises(EnsembleError, match="top-k"):
        select_members(results, 0)


def test_ensemble_and_report_read_the_run_folder_without_the_tune_driver():
    import subprocess
    import sys

    code = ("import sys, mtser.trainer.ensemble, mtser.trainer.report, mtser.trainer.predict; "
            "print(sorted(m for m in ('mtser.trainer.tune', 'ray', 'ray.tune') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
