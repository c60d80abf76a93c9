"""Config files load into typed dataclasses; bad keys and values are errors that name the key."""
from pathlib import Path

import pytest

from mtser.config import ConfigError, SearchConfig, load_config, load_yaml_as

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_paper_config_holds_the_recipe():
    cfg = load_config(CONFIGS / "paper.yaml")
    assert [e.model for e in cfg.extract.encoders] == [
        "microsoft/wavlm-large", "openai/whisper-large-v3", "FacebookAI/roberta-large"]
    assert (cfg.model.proj_dim, cfg.model.lstm_hidden, cfg.model.lstm_layers) == (1028, 2048, 2)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_epochs) == (2e-5, 1e-7, 3.0)
    assert (cfg.train.epochs, cfg.train.samples_per_epoch, cfg.train.batch_size) == (50, 32000, 128)


def test_grid_and_demo_load():
    grid = load_yaml_as(CONFIGS / "grid.yaml", SearchConfig)
    assert grid.alpha == grid.beta == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert grid.pooling == ["asp", "mean"] and grid.sigma == [None, 3.0, 5.0, 7.0]
    assert load_config(CONFIGS / "demo.yaml").model.proj_dim < 1028


@pytest.mark.parametrize("key, value, message", [
    ("model.poolng", "asp", "model.poolng: unknown key"),
    ("model.pooling", "max", "model.pooling: expected one of ['asp', 'mean'], got 'max'"),
    ("train.epochs", "ten", "train.epochs: expected an integer, got 'ten'"),
    ("train.lr", True, "train.lr: expected a number"),
    ("loss.sigma", -3, "loss.sigma: must be positive"),
    ("train.batch_size", 0, "train.batch_size: must be >= 1"),
])
def test_invalid_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(CONFIGS / "paper.yaml", overrides={key: value})


def test_encoder_entries_are_validated(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract:\n  encoders:\n    - {name: w, kind: speach, model: x}\n")
    with pytest.raises(ConfigError, match=r"extract.encoders\[0\].kind: expected one of"):
        load_config(bad)
    unpadded = tmp_path / "unpadded.yaml"
    unpadded.write_text("extract:\n  encoders:\n    - {name: w, kind: whisper, model: x, pad_to_30s: false}\n")
    with pytest.raises(ConfigError, match=r"extract.encoders\[0\]: w.pad_to_30s: false is not supported"):
        load_config(unpadded)
    missing = tmp_path / "missing.yaml"
    missing.write_text("model: {pooling: mean}\n")
    with pytest.raises(ConfigError, match="extract: required key is missing"):
        load_config(missing)


def test_search_rejects_all_zero_weights(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: paper.yaml\nalpha: [0]\nbeta: [0]\npooling: [asp]\nsigma: [null]\n")
    with pytest.raises(ConfigError, match="both weights 0"):
        load_yaml_as(grid, SearchConfig)
