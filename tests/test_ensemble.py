"""`mtser ensemble`: member choice, metrics equal to an independent recomputation, challenge CSVs, manifest."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.featurestore.labels import ATTRIBUTE_COLUMNS, ATTRIBUTES, CLASSES
from mtser.featurestore.store import open_store
from mtser.trainer.config import EnsembleConfig, MemberSelector, load_config
from mtser.trainer.data import evaluation_ids
from mtser.trainer.ensemble import EnsembleError, select_members
from mtser.trainer.infer import evaluate
from isolation import loaded_by
from search_support import REPO


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
    assert (manifest["class_top_k"], manifest["attribute_top_k"]) == (1, 3)     # configs/demo.yaml
    results = pd.read_csv(run / "results.csv")
    for task in ("class", *ATTRIBUTES):                        # classes from cat fine-tunings, attributes from dim
        metric = "f1" if task == "class" else f"ccc_{task}"
        pool = results[results["task"] == ("cat" if task == "class" else "dim")]
        best = pool.sort_values([metric, "trial"], ascending=[False, True]).head(1 if task == "class" else 3)
        if task == "valence":                                  # + the ASP parent of the dim fine-tunings
            parent = results[(results["stage"] == 1) & (results["pooling"] == "asp")
                             & results["trial"].isin(results.loc[results["task"] == "dim", "parent"])]
            assert len(parent) == 1
            best = pd.concat([best, parent])
        assert [m["trial"] for m in members[task]] == best["trial"].tolist()
        assert [m["dev_metric"] for m in members[task]] == pytest.approx(best[metric].tolist())
    assert [m.get("forced", False) for m in members["valence"]][-1] is True
    # demo.yaml declares the baseline for arousal and dominance; not given: one line, recorded, not an error
    assert manifest["missing_external"] == {"arousal": "baseline", "dominance": "baseline"}
    assert ("ensemble.external: 'baseline' for arousal, dominance not given: built without it (add it with "
            "--extra-member arousal,dominance=FILE)") in output.splitlines()
    assert "coverage" in manifest and "scored on" not in output              # all members read the same encoders

    tables = {}
    for m in [m for ms in members.values() for m in ms]:        # independent path: loop.evaluate per member
        _, tables[m["checkpoint"]] = evaluate(m["checkpoint"], str(demo_store), "Development", device="cpu")
    first = next(iter(tables.values()))
    is_x = (open_store(str(demo_store)).utterances.loc[first["id"], "emo_class"] == "X").to_numpy()
    probs = np.mean([tables[m["checkpoint"]][[f"prob_{c}" for c in CLASSES]].to_numpy() for m in members["class"]], 0)
    has_class = first["true_EmoClass"].notna().to_numpy()
    truth = first["true_EmoClass"][has_class].map(CLASSES.index).to_numpy()
    expected = {"f1": f1_score(truth, probs[has_class].argmax(1), labels=range(8), average="macro", zero_division=0)}
    for name in ATTRIBUTES:
        column = ATTRIBUTE_COLUMNS[name]
        mean = np.mean([tables[m["checkpoint"]][column].to_numpy() for m in members[name]], axis=0)
        known = first[f"true_{column}"].notna().to_numpy()
        expected[f"ccc_{name}"] = _ccc(first[f"true_{column}"].to_numpy()[known & ~is_x], mean[known & ~is_x])
        expected[f"challenge_ccc_{name}"] = _ccc(first[f"true_{column}"].to_numpy()[known], mean[known])
    expected["ccc_mean"] = np.mean([expected[f"ccc_{n}"] for n in ATTRIBUTES])
    expected["challenge_f1"] = f1_score(truth, probs[has_class].argmax(1), average="macro")
    assert is_x.any() and expected["challenge_ccc_arousal"] != pytest.approx(expected["ccc_arousal"])
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
        "checkpoint": ["/a", "/b", "/c", None], "f1": [0.2, 0.4, 0.3, 0.9], "task": ["multi", "cat", "dim", "multi"],
        "pooling": ["asp"] * 4,
        "ccc_arousal": [0.5, 0.1, 0.4, 0.9], "ccc_valence": [0.1, 0.2, 0.3, 0.9], "ccc_dominance": [0.3, 0.3, 0.1, 0.9]})
    chosen = select_members(results, EnsembleConfig(2, 2, "all", "all"))
    assert [m["trial"] for m in chosen["class"]] == ["b", "c"]
    assert [m["trial"] for m in chosen["arousal"]] == ["a", "c"]
    assert [m["trial"] for m in chosen["valence"]] == ["c", "b"]
    assert [m["trial"] for m in chosen["dominance"]] == ["a", "b"]    # tie broken by trial name
    with pytest.raises(EnsembleError, match="ensemble.class_from: cat, but no such finished trial"):
        select_members(results[results["task"] != "cat"], EnsembleConfig())


def test_paper_membership_for_a_hand_made_results_table():
    """1 Task-1 model from the cat fine-tunings; 3 per attribute from the dim fine-tunings only; valence also gets
    the ASP Task-2 parent (the stage-1 point the dim fine-tunings started from), even though it ranks below the dim
    models and another stage-1 ASP point (the Task-1 parent) has the better valence CCC."""
    rows = [  # trial, stage, task, pooling, parent, f1, arousal, valence, dominance
        ("s1_asp_a", 1, "multi", "asp", None, 0.50, 0.90, 0.40, 0.90),
        ("s1_asp_b", 1, "multi", "asp", None, 0.10, 0.10, 0.45, 0.10),
        ("s1_mean", 1, "multi", "mean", None, 0.60, 0.95, 0.95, 0.95),
        ("cat-lr1e-5", 2, "cat", "asp", "s1_asp_b", 0.38, 0.20, 0.20, 0.20),
        ("cat-lr1e-6", 2, "cat", "asp", "s1_asp_b", 0.36, 0.20, 0.20, 0.20),
        ("cat-confusion", 2, "cat", "asp", "s1_asp_b", 0.40, 0.20, 0.20, 0.20),
        ("dim_s3", 2, "dim", "asp", "s1_asp_a", 0.05, 0.70, 0.60, 0.50),
        ("dim_s5", 2, "dim", "asp", "s1_asp_a", 0.05, 0.60, 0.70, 0.55),
        ("dim_s7", 2, "dim", "mean", "s1_mean", 0.05, 0.65, 0.50, 0.60),
        ("dim_mse", 2, "dim", "mean", "s1_mean", 0.05, 0.50, 0.65, 0.40)]
    results = pd.DataFrame(rows, columns=["trial", "stage", "task", "pooling", "parent", "f1", "ccc_arousal",
                                          "ccc_valence", "ccc_dominance"]
                           ).assign(status="complete", checkpoint=lambda t: "/" + t.trial)
    paper = load_config(REPO / "configs" / "paper.yaml").ensemble
    chosen = select_members(results, paper)
    trials = {task: [m["trial"] for m in ms] for task, ms in chosen.items()}
    assert trials == {"class": ["cat-confusion"],
                      "arousal": ["dim_s3", "dim_s7", "dim_s5"],
                      "valence": ["dim_s5", "dim_mse", "dim_s3", "s1_asp_a"],   # + the ASP dim parent
                      "dominance": ["dim_s7", "dim_s5", "dim_s3"]}
    assert [m.get("forced", False) for m in chosen["valence"]] == [False, False, False, True]
    # the best stage-1 ASP model by valence CCC would have been the Task-1 parent
    best_asp = dataclasses.replace(paper, extra_members={"valence": [MemberSelector(1, "asp")]})
    assert select_members(results, best_asp)["valence"][-1]["trial"] == "s1_asp_b"

    failed = results.assign(status=lambda t: t["status"].where(t["task"] != "dim", "failed"))
    with_all = dataclasses.replace(paper, class_from="all", attribute_from="all", attribute_top_k=1)  # failed runs too
    assert select_members(failed, with_all)["valence"][-1]["trial"] == "s1_asp_a"
    with pytest.raises(EnsembleError, match=r"extra_members.valence: no finished trial matches .*parent_for: dim "
                                            r"needs the search's stage-2 dim fine-tunings"):
        select_members(results[results["stage"] == 1], with_all)


def test_an_external_member_changes_the_ensemble_by_exactly_its_share(dev_ensemble, demo_store, tmp_path):
    run, manifest, _ = dev_ensemble
    before = pd.read_csv(run / "ensemble" / "Development" / "predictions.csv").set_index("FileName")
    baseline = pd.DataFrame({"FileName": before.index[::-1], "EmoAct": 4.5, "EmoVal": 1.0, "EmoDom": 7.0})
    baseline.to_csv(tmp_path / "baseline.csv", index=False)              # row order is irrelevant: aligned by name
    out = tmp_path / "with-baseline"
    result = CliRunner().invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store), "--out", str(out),
                                      "--extra-member", f"arousal,dominance={tmp_path / 'baseline.csv'}"])
    assert result.exit_code == 0, result.output
    after = pd.read_csv(out / "Development" / "predictions.csv").set_index("FileName")
    k = len(manifest["members"]["arousal"])
    np.testing.assert_allclose(after["EmoAct"], (k * before["EmoAct"] + 4.5) / (k + 1), atol=2e-6)
    np.testing.assert_allclose(after["EmoDom"], (k * before["EmoDom"] + 7.0) / (k + 1), atol=2e-6)
    np.testing.assert_allclose(after["EmoVal"], before["EmoVal"], atol=1e-6)        # valence: not a member
    with_external = json.loads((out / "ensemble.json").read_text())
    recorded = with_external["members"]["arousal"][-1]
    assert recorded["trial"] == "external:baseline.csv" and recorded["external"] == str(tmp_path / "baseline.csv")
    assert len(recorded["sha256"]) == 64 and "external:baseline.csv" in result.output
    assert with_external["missing_external"] == {} and "ensemble.external" not in result.output

    baseline.iloc[3:].to_csv(tmp_path / "short.csv", index=False)
    short = CliRunner().invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store), "--out",
                                     str(tmp_path / "x"), "--extra-member", f"arousal={tmp_path / 'short.csv'}"])
    missing = ", ".join(sorted(before.index[::-1][:3])[:3])
    assert short.exit_code == 1 and f"lacks 3 of the {len(before)} utterances" in short.output
    assert all(name in short.output for name in before.index[::-1][:3]), (missing, short.output)
    wrong = CliRunner().invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store),
                                     "--extra-member", f"class={tmp_path / 'baseline.csv'}"])
    assert wrong.exit_code == 2 and "is not an attribute" in wrong.output

    refused = CliRunner().invoke(app, ["predict", str(tmp_path / "baseline.csv"), "--ensemble", str(out)])
    assert refused.exit_code == 2 and "external members (baseline.csv for arousal, dominance)" in refused.output
    assert "--skip-external" in refused.output


def test_ensemble_and_report_read_the_run_folder_without_the_tune_driver():
    assert loaded_by(["mtser.trainer.ensemble", "mtser.trainer.report", "mtser.trainer.predict"],
                     ("mtser.trainer.tune", "ray", "ray.tune")) == []


def test_members_on_different_encoders_are_scored_on_the_ids_all_can_read(tmp_path):
    """A model on encoder a and one on a + b: Development utterances without b's features are dropped for every
    member (the first member alone could read them), and the ensemble says how many and why."""
    from mtser.featurestore.corpus import Utterance
    from mtser.featurestore.store import StoreWriter
    from mtser.trainer.checkpoint import load_checkpoint
    from mtser.trainer.infer import predict
    from trainer_store import random_checkpoint, write_synthetic_store

    url = write_synthetic_store(tmp_path / "s.zarr", n_train=4, n_dev=12)
    writer = StoreWriter(url, "a-only")                       # 3 Development utterances with features of a only
    for i in range(3):
        writer.add(Utterance(id=f"a_only_{i}.wav", path=None, split="Development", emo_class="H", arousal=4.0,
                             valence=5.0, dominance=3.0), {"a": np.full((6, 12), 0.1 * i)})
    writer.commit()
    run = tmp_path / "run"
    checkpoints = {"on_a": random_checkpoint(run / "on_a", url, ["a"], seed=0),
                   "on_ab": random_checkpoint(run / "on_ab", url, ["a", "b"], seed=1)}
    pd.DataFrame({"stage": 1, "trial": list(checkpoints), "task": "multi", "pooling": "asp", "parent": None,
                  "status": "complete", "checkpoint": list(checkpoints.values()), "f1": [0.5, 0.4],
                  **{f"ccc_{a}": [0.5, 0.4] for a in ATTRIBUTES}}).to_csv(run / "results.csv", index=False)
    overrides = {"ensemble.class_from": "all", "ensemble.attribute_from": "all", "ensemble.class_top_k": 2,
                 "ensemble.attribute_top_k": 2, "ensemble.extra_members": {}, "ensemble.external": {}}
    (run / "search.json").write_text(json.dumps({"base": str(REPO / "configs" / "demo.yaml"),
                                                 "search": {"overrides": overrides}}))
    result = CliRunner().invoke(app, ["ensemble", "--run", str(run), "--store", url])
    assert result.exit_code == 0, result.output
    assert ("Development: scored on the 12 utterances every member can read; dropped 3 (first: a_only_0.wav, "
            "a_only_1.wav, a_only_2.wav): 3 lack b features (needed by on_ab)") in result.output
    manifest = json.loads((run / "ensemble" / "ensemble.json").read_text())
    assert manifest["coverage"]["Development"] == {"scored": 12, "dropped": 3, "lacking": {"b": 3},
                                                   "needed_by": {"b": ["on_ab"]},
                                                   "first": ["a_only_0.wav", "a_only_1.wav", "a_only_2.wav"]}
    assert set(manifest["store_provenance"]["encoders"]) == {"a", "b"}
    table = pd.read_csv(run / "ensemble" / "Development" / "predictions.csv")
    store = open_store(url)
    ids = sorted(evaluation_ids(store, ["a", "b"], "Development"))
    assert table["FileName"].tolist() == ids and len(ids) == 12
    means = np.mean([np.concatenate(predict(load_checkpoint(c)[0], store, ids), axis=-1)[0]
                     for c in checkpoints.values()], axis=0)
    np.testing.assert_allclose(table[[f"prob_{c}" for c in CLASSES] + list(ATTRIBUTE_COLUMNS.values())], means,
                               atol=2e-6)
    empty = CliRunner().invoke(app, ["ensemble", "--run", str(run), "--store", url, "--split", "Test1"])
    assert empty.exit_code == 1
    assert "no Test1 utterance has the features every member needs (['a', 'b'])" in empty.output


def test_members_of_one_architecture_are_scored_in_one_fused_forward_as_one_by_one(tmp_path):
    """`fused_groups` stacks the members that share encoders and model config into one network (one read of the
    features for the group); each member's fused predictions equal that member scored alone."""
    from mtser.featurestore.store import open_store
    from mtser.trainer.checkpoint import load_checkpoint
    from mtser.trainer.data import evaluation_ids
    from mtser.trainer.infer import fused_groups, predict
    from trainer_store import random_checkpoint, write_synthetic_store

    url = write_synthetic_store(tmp_path / "s.zarr", n_train=4, n_dev=12)
    store = open_store(url)
    ids = evaluation_ids(store, ["a", "b"], "Development")
    paths = {name: random_checkpoint(tmp_path / name, url, encoders, seed=seed)
             for seed, (name, encoders) in enumerate([("ab0", ["a", "b"]), ("a", ["a"]), ("ab1", ["a", "b"])])}
    models = {name: load_checkpoint(path)[0] for name, path in paths.items()}
    groups = fused_groups(models)
    assert [(keys, network.size) for keys, network in groups] == [(["ab0", "ab1"], 2), (["a"], 1)]
    for keys, network in groups:
        probs, attrs = predict(network, store, ids, batch_size=5)
        for g, name in enumerate(keys):
            alone_probs, alone_attrs = predict(models[name], store, ids, batch_size=5)
            np.testing.assert_allclose(probs[g], alone_probs[0], rtol=0, atol=1e-6)
            np.testing.assert_allclose(attrs[g], alone_attrs[0], rtol=0, atol=1e-6)
    assert not np.allclose(predict(groups[0][1], store, ids)[0][0], predict(groups[0][1], store, ids)[0][1])
