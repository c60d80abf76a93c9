"""Learned layer weights (issue 24): the weights sum to 1 and learn; mean pooling pools each layer then mixes, equal
to mixing then pooling; ASP at uniform weights pools the mean of the layers; the set-up checks `model.layers`
against the store; `mtser train` on a layered store records the layers and `evaluate` reads them; checkpoints
trained on layers a store (evaluate) or the encoders (predict) lack are refused naming them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.configio import ConfigError, to_dict
from mtser.featurestore.store import open_store
from mtser.trainer import data
from mtser.trainer.checkpoint import CheckpointError, load_checkpoint
from mtser.trainer.config import ModelConfig, load_config
from mtser.trainer.infer import evaluate
from mtser.trainer.layer_mix import LayerMix, read_layers
from mtser.trainer.loop import Member, train_cohort
from mtser.trainer.model import EncoderBranch, FusionNetwork
from trainer_store import random_checkpoint, write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = {"extract.encoders": [{"name": "a", "kind": "speech", "model": "synthetic/a"},
                              {"name": "b", "kind": "speech", "model": "synthetic/b"}],
         "model.encoders": ["a", "b"], "model.attention_dim": 16, "model.proj_dim": 32, "model.lstm_hidden": 32,
         "train.epochs": 2, "train.samples_per_epoch": 64, "train.batch_size": 16}
LAYERS = {"a": [0, 3, 6]}


def config(**overrides):
    return load_config(CONFIGS / "demo.yaml", {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}})


@pytest.fixture(scope="module")
def layered_url(tmp_path_factory) -> str:
    return write_synthetic_store(tmp_path_factory.mktemp("layered") / "s.zarr", n_train=48, n_dev=24, layers=LAYERS)


def frames(b: int = 3, t: int = 6, layers: int = 4, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(b, t, layers, d, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 4:] = mask[2, 1:] = False
    return x, mask


# ----------------------------------------------------------------------------------------------------- the mix
def test_layer_weights_sum_to_one_and_receive_gradients():
    mix = LayerMix(members=3, layers=4)
    with torch.no_grad():
        mix.logits.copy_(torch.randn(3, 4))
    weights = mix.weights()
    assert weights.shape == (3, 4) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    x, _ = frames()
    mixed = mix.mix_frames(x)
    assert mixed.shape == (3, 3, 6, 5)
    torch.testing.assert_close(mixed[1], torch.einsum("l,btld->btd", weights[1], x))
    (mixed * torch.arange(5.0)).sum().backward()
    assert mix.logits.grad is not None and (mix.logits.grad.abs() > 0).all()
    assert torch.equal(LayerMix(2, 4).weights(), torch.full((2, 4), 0.25))            # initialised uniform


@pytest.mark.parametrize("norm", [False, True])
def test_mean_pooling_then_mix_equals_mix_then_mean_pooling(norm):
    """The branch pools each layer once for all members, then mixes: the same as pooling each member's mixed
    frames (the mean is linear), with and without the per-layer normalisation."""
    cfg = ModelConfig(pooling="mean", proj_dim=8, layer_weights=True, layer_norm_per_layer=norm)
    branch = EncoderBranch(members=2, dim=5, cfg=cfg, layers=4)
    with torch.no_grad():
        branch.mix.logits.copy_(torch.randn(2, 4))
    x, mask = frames()
    pool_then_mix = branch.mix.mix_pooled(branch.pool(branch.mix.prepare(x).flatten(2), mask).unflatten(1, (4, 5)))
    mix_then_pool = torch.stack([branch.pool(m, mask) for m in branch.mix.mix_frames(x)])
    torch.testing.assert_close(pool_then_mix, mix_then_pool, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pool_then_mix[0], pool_then_mix[1])      # the members' weights differ: not vacuous


def test_asp_with_uniform_layer_weights_pools_the_mean_of_the_layers():
    """At initialisation (uniform weights) a network with ASP over mixed layers gives what the same network gives
    the mean of the layers as plain frames (the per-member ASP path against the shared one)."""
    cfg = ModelConfig(attention_dim=4, proj_dim=8, lstm_hidden=6, layer_weights=True)
    torch.manual_seed(0)
    mixed = FusionNetwork({"a": 5, "b": 7}, cfg, members=2, read_layers={"a": [1, 2, 3, 4]}).eval()
    plain = FusionNetwork({"a": 5, "b": 7}, cfg, members=2).eval()
    for g in range(2):
        plain.load_member(g, {k: v for k, v in mixed.member_state(g).items() if k != "branches.a.mix.logits"})
    x, mask = frames()
    other = (torch.randn(3, 6, 7), mask)
    with torch.no_grad():
        got = mixed({"a": (x, mask), "b": other})
        want = plain({"a": (x.mean(dim=2), mask), "b": other})
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert mixed.member_state(0)["branches.a.mix.logits"].shape == (4,)


# -------------------------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("overrides, message", [
    ({"model.layer_norm_per_layer": True}, "model.layer_norm_per_layer: normalises the layers before a learned mix"),
    ({"model.layers": {"a": [1, 2]}}, "model.layers.a: 2 layers need a learned mix (model.layer_weights: true)"),
    ({"model.layers": {"a": [-1]}, "model.layer_weights": True}, "model.layers.a: need distinct hidden-state"),
    ({"model.layers": {"c": [1]}}, "model.layers: ['c'] not among extract.encoders"),
])
def test_layer_options_are_checked_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        config(**{k.replace(".", "__"): v for k, v in overrides.items()})
    assert message in str(error.value)


def test_the_set_up_checks_model_layers_against_the_store(layered_url):
    store = open_store(layered_url)
    infos = {n: store.encoders[n] for n in ("a", "b")}
    assert read_layers(config(model__layer_weights=True).model, infos, layered_url) == {"a": [0, 3, 6]}
    assert read_layers(config(model__layers={"a": [6]}).model, infos, layered_url) == {"a": [6]}
    with pytest.raises(ConfigError, match=r"model\.layers\.a: .*holds 3 layers \[0, 3, 6\] of 'a'.*layer_weights"):
        read_layers(config().model, infos, layered_url)
    with pytest.raises(ConfigError, match=r"model\.layers\.a: .*layers \[2, 5\] not stored \(stored: \[0, 3, 6\]\)"):
        read_layers(config(model__layer_weights=True, model__layers={"a": [2, 3, 5]}).model, infos, layered_url)


def test_one_layer_without_weights_is_read_as_plain_frames(layered_url):
    """`model.layers: {a: [3]}` without layer weights: the loader squeezes the layer, padded or packed, and the
    network has no mix."""
    store = open_store(layered_url)
    model = FusionNetwork({"a": 12, "b": 8}, config(model__layers={"a": [3]}).model, read_layers={"a": [3]})
    assert model.layers == {} and model.reader_layers() == {"layers": {"a": [3]}, "squeeze": ["a"]}
    ids = store.ids(split="Train", encoder="a")[:4]
    padded = data.BatchReader(store, ["a", "b"], np.float32, **model.reader_layers())(ids)
    packed = data.BatchReader(store, ["a", "b"], packed=True, **model.reader_layers())(ids)
    x, mask = padded.features["a"]
    assert x.shape == (*mask.shape, 12) and packed.features["a"][0].shape == (int(mask.sum()), 12)
    for row, utt_id in enumerate(ids):
        want = store.get(utt_id, "a", np.float32, layers=[3])[:, 0]
        assert np.array_equal(x[row, : len(want)].numpy(), want)
        assert np.array_equal(data.features_to(packed.features, "cpu")["a"][0][row, : len(want)].numpy(), want)
    with pytest.raises(ValueError, match="squeeze"):
        data.BatchReader(store, ["a"], layers={"a": [0, 3]}, squeeze=["a"])


# ------------------------------------------------------------------------------------------- train and check
def test_mtser_train_on_a_layered_store_records_the_layers_and_evaluates(layered_url, tmp_path):
    cfg = tmp_path / "layered.yaml"
    cfg.write_text(json.dumps(to_dict(config(model__layer_weights=True, model__layers={"a": [3, 6]}))))
    result = CliRunner().invoke(app, ["train", "--config", str(cfg), "--store", layered_url, "--out",
                                      str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    best = tmp_path / "run" / "best"
    assert json.loads((best / "checkpoint.json").read_text())["layers"] == {"a": [3, 6]}
    model, _, _ = load_checkpoint(best)
    assert model.layers == {"a": 2} and model.read_layers == {"a": [3, 6]}
    weights = model.branches["a"].mix.weights()[0]
    assert not torch.allclose(weights, torch.full((2,), 0.5))                          # learned
    metrics, table = evaluate(best, layered_url, device="cpu")
    assert len(table) == len(data.evaluation_ids(open_store(layered_url), ["a", "b"], "Development"))
    assert np.isfinite(metrics["ccc_mean"])

    plain = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "layered.yaml"), "--store", layered_url,
                                     "--out", str(tmp_path / "p"), "--set", "model.layer_weights=false",
                                     "--set", "model.layers=null"])
    assert plain.exit_code == 2 and "model.layers.a" in plain.output and "layer_weights" in plain.output


def test_evaluate_refuses_a_store_lacking_the_layers_trained_on(layered_url, tmp_path):
    checkpoint = random_checkpoint(tmp_path / "ck", layered_url, ["a", "b"], overrides={"model.layer_weights": True})
    assert load_checkpoint(checkpoint)[2]["layers"] == {"a": [0, 3, 6]}
    fewer = write_synthetic_store(tmp_path / "fewer.zarr", n_train=8, n_dev=8, layers={"a": [0, 6, 9]})
    with pytest.raises(CheckpointError, match=r"encoder 'a': layers \[3\] not stored \(stored: \[0, 6, 9\]\); "
                                              r"the checkpoint was trained on layers \[0, 3, 6\]"):
        evaluate(checkpoint, fewer, device="cpu")
    more = write_synthetic_store(tmp_path / "more.zarr", n_train=8, n_dev=8, layers={"a": [0, 1, 3, 6]})
    assert len(evaluate(checkpoint, more, device="cpu")[1]) > 0                     # more layers are fine
    result = CliRunner().invoke(app, ["evaluate", checkpoint, "--store", fewer])
    assert result.exit_code != 0 and "layers [3] not stored" in result.output
    sidecar = Path(checkpoint) / "checkpoint.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "layers": {"a": [3, 3]}}))
    with pytest.raises(CheckpointError, match=r"checkpoint.json: layers: expected lists of distinct hidden-state"):
        load_checkpoint(checkpoint)
    parent = random_checkpoint(tmp_path / "parent", layered_url, ["a", "b"], overrides={"model.layer_weights": True})
    finetune = Member("ft", load_checkpoint(parent)[1], tmp_path / "ft", "finetune", parent, "dim")
    with pytest.raises(CheckpointError, match=r"layers \{'a': \[0, 3, 6\]\}.*differs from the config's.*layers "
                                              r"\{'a': \[0, 1, 3, 6\]\}"):
        train_cohort([finetune], more)                 # stage 2 reads the layers its parent was trained on
    old = write_synthetic_store(tmp_path / "old.zarr", n_train=8, n_dev=8)          # one stored state
    plain = random_checkpoint(tmp_path / "plain", old, ["a", "b"])
    with pytest.raises(CheckpointError, match="differs from the checkpoint's in layers"):
        evaluate(plain, layered_url, device="cpu")


def test_predict_selects_the_layers_and_refuses_layers_the_encoders_lack(demo_corpus_dir, test_encoders_dir,
                                                                         tmp_path):
    """`mtser predict` on audio: the encoders give all stored layers, each member reads its own (a layer-weights
    member and a one-layer member in one ensemble), exactly as from the store; a member trained on a layer the
    encoders do not give is refused naming it, the encoder and the layer."""
    from mtser.featurestore.config import EncoderConfig, ExtractConfig
    from mtser.featurestore.corpus import read_corpus
    from mtser.featurestore.extract import extract
    from mtser.trainer.ensemble import TASKS
    from mtser.trainer.infer import predict
    from mtser.trainer.predict import predict_files

    utts = [u for u in read_corpus(demo_corpus_dir).utterances if u.split == "Development"][:2]
    url = str(tmp_path / "store.zarr")
    encoder = EncoderConfig("w", "speech", str(test_encoders_dir / "wavlm"), layers=[0, 1, -1], dtype="float32")
    assert extract(utts, ExtractConfig(encoders=[encoder]), url, workers=0, progress=False).ok
    store = open_store(url)
    stored = list(store.encoders["w"].layers)
    mixed = random_checkpoint(tmp_path / "mixed", url, ["w"], overrides={"model.layer_weights": True})
    one = random_checkpoint(tmp_path / "one", url, ["w"], seed=1, overrides={"model.layers": {"w": [stored[1]]}})
    manifest = tmp_path / "ensemble.json"
    manifest.write_text(json.dumps({"members": {t: [{"trial": "mixed", "checkpoint": mixed},
                                                    {"trial": "one", "checkpoint": one}] for t in TASKS}}))
    paths = [u.path for u in utts]
    table = predict_files(paths, manifest).table.set_index("FileName").loc[paths]
    ids = [u.id for u in utts]
    members = [predict(load_checkpoint(c)[0], store, ids) for c in (mixed, one)]
    np.testing.assert_allclose(table["EmoAct"].to_numpy(float), np.mean([a[0][:, 0] for _, a in members], axis=0),
                               atol=1e-5)

    sidecar = Path(one) / "checkpoint.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "layers": {"w": [stored[1] + 100]}}))
    result = CliRunner().invoke(app, ["predict", *paths, "--ensemble", str(manifest)])
    assert result.exit_code != 0, result.output
    assert all(word in result.output for word in (one, "'w'", f"layers [{stored[1] + 100}] not stored"))
