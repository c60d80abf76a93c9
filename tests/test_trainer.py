"""Training, fine-tuning, evaluation and checkpoints on a real (small, synthetic) Zarr store."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mtser.configio import ConfigError, from_dict, to_dict
from mtser.trainer.config import Config, load_config
from mtser.featurestore.labels import ATTRIBUTE_COLUMNS, ATTRIBUTES, CLASSES
from mtser.trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mtser.trainer.config import Config, load_config
from mtser.trainer.data import evaluation_ids
from mtser.trainer.infer import evaluate, predict
from mtser.trainer.loop import finetune_config, lr_factor, train
from mtser.trainer.metrics import LabelArrays, summarize
from isolation import loaded_by
from trainer_store import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TIMING = ("train_seconds", "data_wait_fraction")
SMALL = {"extract.encoders": [{"name": "a", "kind": "speech", "model": "synthetic/a"},
                              {"name": "b", "kind": "speech", "model": "synthetic/b"}],
         "model.encoders": ["a", "b"], "model.attention_dim": 16, "model.proj_dim": 32, "model.lstm_hidden": 32,
         "train.epochs": 8, "train.samples_per_epoch": 256, "train.batch_size": 32, "train.lr": 5e-3,
         **{f"finetune.{task}.{key}": value for task in ("cat", "dim")
            for key, value in (("epochs", 2), ("samples_per_epoch", 128), ("batch_size", 32))}}


def small_config(**overrides) -> Config:
    return load_config(CONFIGS / "demo.yaml", {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}})


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "s.zarr")


@pytest.fixture(scope="module")
def trained(store_url, tmp_path_factory):
    return train(small_config(), store_url, tmp_path_factory.mktemp("run"))


def test_short_run_clearly_beats_chance(trained, store_url):
    """The best checkpoint's Development metrics beat chance for these very predictions: the same metrics against
    300 shuffles of the labels (a permutation null), and the training loss falls."""
    m = trained.best_metrics
    assert m["f1"] > 0.45 and m["ccc_mean"] > 0.6, m  # observed (seeds 0-2): F1 0.64-0.77, CCC 0.91-0.92
    metrics, table = evaluate(trained.best_checkpoint, store_url, device="cpu")
    # the reloaded checkpoint reproduces the development metrics recorded when it was saved
    assert metrics == pytest.approx({k: m[k] for k in metrics}, abs=1e-6)
    probs = table[[f"prob_{c}" for c in CLASSES]].to_numpy()
    attrs = table[[ATTRIBUTE_COLUMNS[a] for a in ATTRIBUTES]].to_numpy()
    classes = np.array([CLASSES.index(c) if isinstance(c, str) else -1 for c in table["true_EmoClass"]])
    truth = table[[f"true_{ATTRIBUTE_COLUMNS[a]}" for a in ATTRIBUTES]].to_numpy()
    rng = np.random.default_rng(0)
    null = [summarize(probs, attrs, LabelArrays(classes[p], truth[p]))
            for p in (rng.permutation(len(table)) for _ in range(300))]
    for key in ("f1", "ccc_mean"):
        assert metrics[key] > np.quantile([n[key] for n in null], 0.99), key
    assert trained.history[-1]["train_loss"] < trained.history[0]["train_loss"]
    assert len(trained.history) == 8 and trained.best_epoch == max(
        trained.history, key=lambda row: row["score"])["epoch"]


def test_history_and_checkpoint_contents(trained, store_url):
    history = pd.read_csv(trained.best_checkpoint.parent / "history.csv")
    assert list(history["epoch"]) == list(range(1, 9)) and {"lr", "train_loss", "f1", "ccc_mean"} <= set(history)
    assert sorted(p.name for p in trained.best_checkpoint.iterdir()) == ["checkpoint.json", "model.safetensors"]
    meta = json.loads((trained.best_checkpoint / "checkpoint.json").read_text())
    assert meta["input_dims"] == {"a": 12, "b": 8}
    assert meta["label_map"]["classes"] == ["A", "S", "H", "U", "F", "D", "C", "N"]
    assert meta["store"]["url"] == store_url and meta["store"]["encoders"]["a"]["model"] == "synthetic/a"
    assert meta["metrics"] == pytest.approx(trained.best_metrics) and meta["epoch"] == trained.best_epoch
    assert from_dict(Config, meta["config"]) == small_config()


def test_checkpoint_round_trip_gives_identical_predictions(trained, store_url, tmp_path):
    from mtser.featurestore.store import open_store

    store = open_store(store_url)
    ids = evaluation_ids(store, ["a", "b"], "Development")
    model, cfg, meta = load_checkpoint(trained.best_checkpoint)
    probs, attrs = predict(model, store, ids)
    save_checkpoint(tmp_path / "copy", model, cfg, meta)
    again, _, _ = load_checkpoint(tmp_path / "copy")
    probs2, attrs2 = predict(again, store, ids)
    np.testing.assert_array_equal(probs, probs2)
    np.testing.assert_array_equal(attrs, attrs2)
    _, table = evaluate(tmp_path / "copy", store, "Development", device="cpu")     # evaluate's table: the same
    assert list(table["id"]) == ids and table["EmoClass"].isin(list("ASHUFDCN")).all()
    np.testing.assert_allclose(table[[f"prob_{c}" for c in CLASSES]].to_numpy(), probs[0], rtol=1e-6)


def test_checkpoints_written_before_per_task_sections_still_load(trained, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained.best_checkpoint, old)
    sidecar = json.loads((old / "checkpoint.json").read_text())
    dim = {**sidecar["config"]["finetune"]["dim"], "epochs": 7}
    sidecar["config"]["finetune"] = dim                       # mtser 0.1: one section, its task inside
    sidecar["config"]["ensemble"] = {"top_k": 2}
    (old / "checkpoint.json").write_text(json.dumps(sidecar))
    _, cfg, _ = load_checkpoint(old)
    assert cfg.finetune.dim.epochs == 7 and cfg.finetune.cat == load_config(CONFIGS / "paper.yaml").finetune.cat
    assert (cfg.ensemble.class_top_k, cfg.ensemble.attribute_top_k, cfg.ensemble.class_from) == (2, 2, "all")


def test_cpu_runs_are_reproducible(store_url, tmp_path):
    cfg = small_config(train__epochs=2, train__samples_per_epoch=96)
    runs = [train(cfg, store_url, tmp_path / f"run{i}").history for i in range(2)]
    strip = lambda h: [{k: v for k, v in row.items() if k not in TIMING} for row in h]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])
    other = train(small_config(train__epochs=2, train__samples_per_epoch=96, train__seed=1), store_url, tmp_path / "s1")
    assert strip(other.history) != strip(runs[0])


@pytest.mark.parametrize("task, sigma, metric", [("cat", None, "f1"), ("dim", 3.0, "ccc_mean"), ("dim", None, "ccc_mean")])
def test_finetune_stages_start_from_the_checkpoint(trained, store_url, tmp_path, task, sigma, metric):
    _, parent_cfg, _ = load_checkpoint(trained.best_checkpoint)
    cfg = finetune_config(parent_cfg, task, sigma)
    schedule = cfg.schedule("finetune", task)
    assert (schedule.task, schedule.select_metric, cfg.loss.sigma) == (task, metric, sigma)
    result = train(cfg, store_url, tmp_path, stage="finetune", task=task, init_from=trained.best_checkpoint)
    meta = json.loads((result.best_checkpoint / "checkpoint.json").read_text())
    assert meta["stage"] == "finetune" and meta["task"] == task and meta["parent"] == str(trained.best_checkpoint)
    # fine-tuning starts from stage-1 weights, so the first epoch is already far above chance
    assert result.history[0][metric] > 0.3
    if task == "cat":
        assert meta["train_utterances"] < json.loads((trained.best_checkpoint / "checkpoint.json").read_text())[
            "train_utterances"]  # O rows dropped


@pytest.mark.parametrize("task, epochs, lr", [("cat", 20, 1e-5), ("dim", 30, 5e-6)])
def test_finetune_runs_the_task_schedule_of_the_paper(trained, store_url, tmp_path, task, epochs, lr):
    """paper.yaml's finetune.<task> (epochs, max lr, cosine to 1e-7, no warm-up) is what `mtser finetune` runs."""
    paper = load_config(CONFIGS / "paper.yaml").schedule("finetune", task)
    _, parent_cfg, _ = load_checkpoint(trained.best_checkpoint)
    section = {**to_dict(paper), "samples_per_epoch": 16, "batch_size": 16, "eval_batch_size": 64, "device": "cpu"}
    cfg = load_config(CONFIGS / "demo.yaml", {**SMALL, f"finetune.{task}": section})
    assert (cfg.schedule("finetune", task).epochs, cfg.schedule("finetune", task).lr) == (epochs, lr)
    result = train(cfg, store_url, tmp_path, stage="finetune", task=task, init_from=trained.best_checkpoint)
    assert len(result.history) == epochs
    # one step per epoch: the lr the optimiser holds after epoch e is the cosine from lr to 1e-7, no warm-up
    expected = [lr * lr_factor(e, epochs, 0, lr, 1e-7) for e in range(1, epochs + 1)]
    assert [row["lr"] for row in result.history] == pytest.approx(expected, rel=1e-9)
    assert result.history[-1]["lr"] == pytest.approx(1e-7)


def test_successive_halving_stops_the_worse_half_at_each_milestone(store_url, tmp_path):
    """4 members, 3 epochs, grace 1, factor 2: milestones after epochs 1 and 2. At each, the better half by the
    objective (score) goes on; a stopped member has exactly the epochs it ran, in its result and its history.csv, and
    keeps its best checkpoint."""
    from mtser.trainer.search_config import AshaConfig
    from mtser.trainer.loop import Member, halving_milestones, train_cohort

    asha = AshaConfig(grace_period=1, reduction_factor=2)
    assert halving_milestones(asha, 3) == {1, 2} and halving_milestones(None, 3) == set()
    members = [Member(f"lr{k}", small_config(train__lr=lr, train__epochs=3, train__samples_per_epoch=128),
                      tmp_path / f"lr{k}") for k, lr in enumerate([1e-5, 3e-3, 1e-4, 1e-3])]
    reported: list[tuple[int, list[str]]] = []
    results = train_cohort(members, store_url, halving=asha,
                           on_epoch=lambda epoch, rows: reported.append((epoch, sorted(r.name for r in rows))))
    score = lambda name, epoch: results[name].history[epoch - 1]["score"]  # noqa: E731
    after1 = sorted(results, key=lambda n: score(n, 1))[-2:]                 # the better half at epoch 1
    after2 = max(after1, key=lambda n: score(n, 2))                           # the better of those at epoch 2
    epochs = {name: 3 if name == after2 else 2 if name in after1 else 1 for name in results}
    assert [(e, len(names)) for e, names in reported] == [(1, 4), (2, 2), (3, 1)]
    assert reported[1][1] == sorted(after1) and reported[2][1] == [after2]
    for name, result in results.items():
        assert result.status == ("complete" if name == after2 else "stopped"), name
        assert [row["epoch"] for row in result.history] == list(range(1, epochs[name] + 1)), name
        assert len(pd.read_csv(tmp_path / name / "history.csv")) == epochs[name], name
        meta = json.loads((result.best_checkpoint / "checkpoint.json").read_text())
        assert meta["epoch"] == result.best_epoch <= epochs[name], name


def test_selection_split_holds_out_whole_speakers_deterministically(store_url):
    from mtser.featurestore.store import open_store
    from mtser.trainer.data import selection_split, training_ids

    store = open_store(store_url)
    originals = [i for i in evaluation_ids(store, ["a", "b"], "Train")]
    splits = {seed: selection_split(store, ["a", "b"], 0.1, seed) for seed in range(6)}
    assert splits[0] == selection_split(store, ["a", "b"], 0.1, 0)               # seeded: the same every time
    assert len({tuple(v) for v in splits.values()}) > 1                          # and the seed matters
    speaker = store.utterances["speaker"]
    group = max(speaker.loc[originals].value_counts())
    for held in splits.values():
        rest = sorted(set(originals) - set(held))
        assert not set(speaker.loc[held]) & set(speaker.loc[rest])              # disjoint by speaker
        assert 0.1 * len(originals) <= len(held) < 0.1 * len(originals) + group
        pool = training_ids(store, ["a", "b"], "multi", exclude=held)
        assert not set(pool) & set(held)
        copies = store.utterances.loc[pool, "source_id"].dropna()
        assert not set(copies) & set(held)                                       # nor their augmented copies
    assert len(training_ids(store, ["a", "b"], "multi", augmented=False)) < len(training_ids(store, ["a", "b"],
                                                                                             "multi"))
    store.utterances.loc[originals, "speaker"] = "Unknown"                       # unknown: each utterance alone
    held = selection_split(store, ["a", "b"], 0.1, 0)
    assert len(held) == int(np.ceil(0.1 * len(originals)))


def test_validation_selects_on_held_out_train_and_tests_on_development(store_url, tmp_path):
    from mtser.featurestore.store import open_store
    from mtser.trainer.data import label_arrays, selection_split
    from mtser.trainer.metrics import summarize

    cfg = small_config(train__epochs=3, train__samples_per_epoch=96, train__validation=0.2)
    result = train(cfg, store_url, tmp_path)
    meta = json.loads((result.best_checkpoint / "checkpoint.json").read_text())
    assert meta["selection_split"] == "Train held out (0.2 by speaker, seed 0)"
    store = open_store(store_url)
    held = selection_split(store, ["a", "b"], 0.2, 0)
    model, _, _ = load_checkpoint(result.best_checkpoint)
    (probs,), (attrs,) = predict(model, store, held)
    selected = summarize(probs, attrs, label_arrays(store.utterances, held))
    for key in ("f1", "ccc_mean", "score"):                         # selection metrics: the held-out speakers
        assert result.best_metrics[key] == pytest.approx(selected[key], abs=1e-5)
    tested, _ = evaluate(result.best_checkpoint, store, "Development", device="cpu")
    assert result.test_metrics == pytest.approx(tested, abs=1e-5)    # test metrics: Development
    assert meta["test_split"] == "Development" and meta["test_metrics"] == pytest.approx(tested, abs=1e-5)
    assert result.test_metrics["f1"] != pytest.approx(result.best_metrics["f1"])


def test_an_unreadable_utterance_is_skipped_not_fatal(tmp_path):
    from mtser.featurestore.corpus import Utterance
    from mtser.featurestore.store import StoreWriter

    url = write_synthetic_store(tmp_path / "s.zarr", n_train=24, n_dev=8)
    writer = StoreWriter(url, "part-bad")
    writer.add(Utterance("bad.wav", None, "Train", "A", 2.0, 3.0, 4.0), {"a": np.ones((5, 12)), "b": np.ones((4, 8))})
    writer.commit()
    (tmp_path / "s.zarr/parts/part-bad/features/a/frames/c/0/0").write_bytes(b"")  # its frames are lost
    result = train(small_config(train__epochs=2, train__samples_per_epoch=48, train__batch_size=8), url,
                   tmp_path / "out")
    assert [row["skipped_utterances"] for row in result.history] == [1, 1]
    meta = json.loads((result.best_checkpoint / "checkpoint.json").read_text())
    assert list(meta["unreadable_utterances"]) == ["bad.wav"] and "bad.wav" in meta["unreadable_utterances"]["bad.wav"]


def test_history_csv_is_replaced_whole_each_epoch(store_url, tmp_path):
    """A reader that opened history.csv after epoch 1 still reads epoch 1's complete file after epoch 2: each epoch's
    file is written aside and renamed over the old one, never rewritten in place; no temporary file stays behind."""
    opened = []

    def on_epoch(epoch, row, best_dir):
        if epoch == 1:
            opened.append(open(tmp_path / "history.csv"))

    result = train(small_config(train__epochs=2, train__samples_per_epoch=64), store_url, tmp_path, on_epoch=on_epoch)
    with opened[0] as first:
        assert pd.read_csv(first)["epoch"].tolist() == [1]
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [row["epoch"] for row in result.history] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "history.csv"]


def test_training_does_not_import_inference():
    assert loaded_by(["mtser.trainer.loop", "mtser.trainer.tune", "mtser.trainer.cohort"], ("mtser.trainer.infer",)) == []


def test_finetune_rejects_a_different_model(trained, store_url, tmp_path):
    cfg = finetune_config(small_config(model__proj_dim=16), "cat")
    with pytest.raises(CheckpointError, match="differs from the config"):
        train(cfg, store_url, tmp_path, stage="finetune", task="cat", init_from=trained.best_checkpoint)


def test_evaluate_refuses_features_of_another_encoder(trained, tmp_path):
    other = write_synthetic_store(tmp_path / "other.zarr", n_train=8, n_dev=8, dims={"a": 12, "b": 9})
    with pytest.raises(CheckpointError, match=r"encoder 'b' differs .* dim \(9 vs 8\)"):
        evaluate(trained.best_checkpoint, other)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    lr, floor, total, warmup = 2e-5, 1e-7, 100, 10
    factors = [lr_factor(s, total, warmup, lr, floor) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] * lr == pytest.approx(floor)


@pytest.mark.parametrize("key, value, message", [
    ("model.dropout", 1.5, "model.dropout: must be in [0, 1)"),
    ("model.proj_dim", 0, "model.proj_dim: must be >= 1"),
    ("loss.class_weights", [1.0, 2.0], "loss.class_weights: need 8 non-negative values"),
    ("loss.class_weights", "inverse", "loss.class_weights: expected one of ['auto', 'none', 'confusion']"),
    ("train.grad_clip", 0, "train.grad_clip: must be > 0"),
    ("finetune.dim.warmup_epochs", -1, "finetune.dim.warmup_epochs: must be >= 0"),
    ("train.select_metric", "acc", "train.select_metric: expected one of"),
])
def test_invalid_trainer_config_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "paper.yaml", overrides={key: value})
    assert message in str(error.value)


def test_a_select_metric_the_split_cannot_compute_is_rejected(tmp_path):
    url = write_synthetic_store(tmp_path / "s.zarr", n_train=16, n_dev=8)
    from mtser.featurestore.store import open_store

    store = open_store(url)
    store.utterances.loc[store.utterances.split == "Development", "emo_class"] = "O"  # no class labels to score
    with pytest.raises(ConfigError, match="train.select_metric: 'score' cannot be computed"):
        train(small_config(), store, tmp_path / "out")


def test_cli_train_finetune_evaluate(store_url, tmp_path):
    from mtser.cli.main import app

    runner = CliRunner()
    small = [f"--set=train.{k}" for k in ("epochs=2", "samples_per_epoch=64")]
    config = tmp_path / "small.yaml"
    config.write_text(json.dumps(to_dict(small_config())))  # JSON is YAML
    result = runner.invoke(app, ["train", "--config", str(config), "--store", store_url, "--out", str(tmp_path / "s1"),
                                 "--no-progress", *small])
    assert result.exit_code == 0, result.output
    assert result.output.count("epoch ") >= 2 and "dev: f1 " in result.output and "ccc_mean" in result.output
    held_out = runner.invoke(app, ["train", "--config", str(config), "--store", store_url, "--out",
                                   str(tmp_path / "v"), "--no-progress", *small, "--set", "train.validation=0.2"])
    assert held_out.exit_code == 0, held_out.output
    assert "held-out: f1 " in held_out.output and "test (Development): f1 " in held_out.output
    result = runner.invoke(app, ["finetune", "--from", str(tmp_path / "s1" / "best"), "--task", "dim", "--sigma", "5",
                                 "--store", store_url, "--out", str(tmp_path / "s2"), "--no-progress",
                                 "--set", "finetune.dim.epochs=1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s2" / "best" / "checkpoint.json").read_text())["config"]["loss"]["sigma"] == 5.0
    csv = tmp_path / "pred.csv"
    result = runner.invoke(app, ["evaluate", str(tmp_path / "s2" / "best"), "--store", store_url,
                                 "--split", "Development", "--predictions", str(csv)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output.strip().splitlines()[-1])
    assert printed["ccc_mean"] > 0 and printed["challenge_ccc_mean"] != printed["ccc_mean"]   # the store has X rows
    assert f"challenge_f1 {printed['challenge_f1']:.4f}" in result.output
    assert len(pd.read_csv(csv)) == int(result.output.split(": ")[1].split()[0])


@pytest.mark.parametrize("args, code, message", [
    (["train", "--config", "{cfg}", "--store", "{store}", "--out", "{out}", "--set", "model.dropout=2"], 2,
     "model.dropout: must be in [0, 1)"),
    (["train", "--config", "{cfg}", "--store", "{store}", "--out", "{out}/new", "--set",
      "loss.penalty_weight_grad=maybe"], 2, "loss.penalty_weight_grad: expected true/false, got 'maybe'"),
    (["train", "--config", "{cfg}", "--store", "{out}/missing.zarr", "--out", "{out}/new"], 1, "missing.zarr"),
    (["finetune", "--from", "{out}", "--task", "cat", "--store", "{store}", "--out", "{out}"], 1,
     "not a checkpoint directory"),
    (["finetune", "--from", "{out}", "--task", "both", "--store", "{store}", "--out", "{out}"], 2, "--task"),
    (["evaluate", "{out}", "--store", "{store}", "--split", "Dev"], 2, "--split"),
])
def test_cli_errors_have_messages_and_exit_codes(store_url, tmp_path, args, code, message):
    from mtser.cli.main import app

    config = tmp_path / "small.yaml"
    config.write_text(json.dumps(to_dict(small_config())))
    args = [a.format(cfg=config, store=store_url, out=tmp_path) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code and message in result.output, result.output


def test_cli_train_finetune_evaluate_read_store_and_parent_from_s3(store_url, moto_s3, s3_bucket, tmp_path):
    import s3fs

    from mtser.cli.main import app

    fs = s3fs.S3FileSystem(**moto_s3, skip_instance_cache=True)
    fs.put(store_url, f"{s3_bucket}/store.zarr", recursive=True)
    store, options = f"s3://{s3_bucket}/store.zarr", ["--storage-options", json.dumps(moto_s3)]
    config = tmp_path / "small.yaml"
    config.write_text(json.dumps(to_dict(small_config())))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", str(config), "--store", store, "--out", str(tmp_path / "s1"),
                                 "--no-progress", "--set", "train.epochs=1", "--set", "train.samples_per_epoch=32",
                                 *options])
    assert result.exit_code == 0, result.output
    fs.put(str(tmp_path / "s1" / "best"), f"{s3_bucket}/s1/best", recursive=True)
    parent = f"s3://{s3_bucket}/s1/best"
    result = runner.invoke(app, ["finetune", "--from", parent, "--task", "cat", "--store", store,
                                 "--out", str(tmp_path / "s2"), "--no-progress", "--set", "finetune.cat.epochs=1", *options])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s2" / "best" / "checkpoint.json").read_text())["parent"] == parent
    remote = runner.invoke(app, ["evaluate", parent, "--store", store, "--device", "cpu", *options])
    local = runner.invoke(app, ["evaluate", str(tmp_path / "s1" / "best"), "--store", store_url, "--device", "cpu"])
    assert remote.exit_code == 0 and local.exit_code == 0, remote.output + local.output
    assert json.loads(remote.output.splitlines()[-1]) == json.loads(local.output.splitlines()[-1])
    missing = runner.invoke(app, ["evaluate", f"s3://{s3_bucket}/nothing", "--store", store, *options])
    assert missing.exit_code == 1 and f"s3://{s3_bucket}/nothing: not a checkpoint directory" in missing.output


def _flip_weight_byte(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10                                          # inside the last tensor's values
    weights.write_bytes(bytes(data))


def _nan_weights(ckpt: Path) -> None:
    model, cfg, meta = load_checkpoint(ckpt)
    with __import__("torch").no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_checkpoint(ckpt, model, cfg, meta)                   # a consistent SHA-256: the NaN check must catch it


@pytest.mark.parametrize("damage, message", [
    (_flip_weight_byte, "differs from"),
    (_nan_weights, "weights contain NaN or inf"),
])
def test_damaged_checkpoint_weights_are_refused_naming_the_checkpoint(trained, store_url, tmp_path, damage, message):
    import shutil

    from mtser.cli.main import app

    ckpt = tmp_path / "damaged"
    shutil.copytree(trained.best_checkpoint, ckpt)
    damage(ckpt)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)
    result = CliRunner().invoke(app, ["evaluate", str(ckpt), "--store", store_url, "--split", "Development"])
    assert result.exit_code == 1 and str(ckpt) in result.output and message in result.output, result.output
    assert "ccc_mean" not in result.output


def test_a_checkpoint_without_a_recorded_sha256_loads_with_one_warning(trained, tmp_path, caplog):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained.best_checkpoint, old)
    sidecar = json.loads((old / "checkpoint.json").read_text())
    assert len(sidecar.pop("sha256")["model.safetensors"]) == 64
    (old / "checkpoint.json").write_text(json.dumps(sidecar))
    with caplog.at_level("WARNING", logger="mtser.trainer.checkpoint"):
        load_checkpoint(old)
        load_checkpoint(old)
    warned = [r.getMessage() for r in caplog.records if "SHA-256" in r.getMessage()]
    assert len(warned) == 1 and str(old) in warned[0] and "unverified" in warned[0]


def _drop_dev_offsets(url: Path) -> str:
    next(p for p in (url / "parts/part-development/features/a/offsets/c").rglob("*") if p.is_file()).unlink()
    return "offsets are not 0 < ... strictly increasing"


def _flip_dev_frame(url: Path) -> str:
    from mtser.featurestore.store import open_store

    store = open_store(str(url))
    utt = evaluation_ids(store, ["a", "b"], "Development")[3]
    seg, i = store.locate(utt, "b")
    shard = url / seg.layout.shard_key
    data = bytearray(shard.read_bytes())
    data[seg.reader.ranges(*seg.rows(i))[0][1] + 1] ^= 0x40
    shard.write_bytes(bytes(data))
    return f"utterance {utt!r} in {seg.path}: checksum mismatch"


def test_evaluate_says_what_it_scored_and_which_parts_it_skipped(trained, tmp_path):
    from mtser.cli.main import app
    from mtser.featurestore.corpus import Utterance
    from mtser.featurestore.store import StoreWriter

    url = write_synthetic_store(tmp_path / "s.zarr", n_train=24, n_dev=12)
    from mtser.featurestore.store import open_store

    n = len(evaluation_ids(open_store(url), ["a", "b"], "Development"))
    args = ["evaluate", str(trained.best_checkpoint), "--store", url, "--split", "Development"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"scored {n} of the {n} original utterances of Development in the store; no part skipped" in result.output
    writer = StoreWriter(url, "part-late")                   # a writer that has not committed (yet)
    writer.add(Utterance("late.wav", None, "Development", "A", 2.0, 3.0, 4.0), {"a": np.ones((5, 12))})
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"scored {n} of the {n} " in result.output and "skipped parts: part-late (not committed: being written by " \
        in result.output
    writer.commit()                                           # only "a" features: no "b", so it cannot be scored
    result = CliRunner().invoke(app, args)
    assert f"scored {n} of the {n + 1} original utterances of Development in the store (1 lack features" \
        in result.output


@pytest.mark.parametrize("damage", [_drop_dev_offsets, _flip_dev_frame])
def test_evaluate_refuses_a_damaged_store(trained, tmp_path, damage):
    from mtser.cli.main import app

    url = write_synthetic_store(tmp_path / "s.zarr", n_train=24, n_dev=12)
    message = damage(tmp_path / "s.zarr")
    csv = tmp_path / "pred.csv"
    result = CliRunner().invoke(app, ["evaluate", str(trained.best_checkpoint), "--store", url, "--split",
                                      "Development", "--predictions", str(csv)])
    assert result.exit_code == 1 and message in result.output and "ccc_mean" not in result.output, result.output
    assert not csv.exists()


def test_train_never_learns_from_flipped_frame_bytes(tmp_path):
    from mtser.featurestore.store import open_store

    url = write_synthetic_store(tmp_path / "s.zarr", n_train=24, n_dev=8)
    store = open_store(url)
    utt = store.ids(split="Train", encoder="a")[5]
    seg, i = store.locate(utt, "a")
    shard = tmp_path / "s.zarr" / seg.layout.shard_key
    data = bytearray(shard.read_bytes())
    data[seg.reader.ranges(*seg.rows(i))[0][1] + 1] ^= 0x40
    shard.write_bytes(bytes(data))
    result = train(small_config(train__epochs=2, train__samples_per_epoch=48, train__batch_size=8), url,
                   tmp_path / "out")
    meta = json.loads((result.best_checkpoint / "checkpoint.json").read_text())
    assert list(meta["unreadable_utterances"]) == [utt] and "checksum mismatch" in meta["unreadable_utterances"][utt]
