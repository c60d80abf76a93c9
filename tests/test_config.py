"""Config files load into typed dataclasses; bad keys and values are errors that name the key."""
import pickle
import re
from pathlib import Path

import pytest
import yaml

from mtser.configio import ConfigError, load_yaml_as, to_dict
from mtser.featurestore.config import EncoderConfig, ExtractConfig
from mtser.trainer.config import (
    CatFinetuneConfig, DimFinetuneConfig, LossConfig, ModelConfig, TrainConfig, load_config,
)
from mtser.trainer.search_config import AshaConfig, SearchConfig
from isolation import loaded_by

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_paper_config_holds_the_recipe():
    cfg = load_config(CONFIGS / "paper.yaml")
    assert [e.model for e in cfg.extract.encoders] == [
        "microsoft/wavlm-large", "openai/whisper-large-v3", "FacebookAI/roberta-large"]
    assert (cfg.model.proj_dim, cfg.model.lstm_hidden, cfg.model.lstm_layers) == (1028, 2048, 2)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_epochs) == (2e-5, 1e-7, 3.0)
    assert (cfg.train.epochs, cfg.train.samples_per_epoch, cfg.train.batch_size) == (50, 32000, 128)
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.penalty_weight_grad) == (0.25, 0.75, True)
    cat, dim = cfg.finetune.cat, cfg.finetune.dim
    assert (cat.task, cat.epochs, cat.lr, cat.warmup_epochs, cat.select_metric) == ("cat", 20, 1e-5, 0.0, "f1")
    assert (dim.task, dim.epochs, dim.lr, dim.min_lr, dim.warmup_epochs) == ("dim", 30, 5e-6, 1e-7, 0.0)
    assert (cfg.ensemble.class_top_k, cfg.ensemble.attribute_top_k) == (1, 3)
    assert [(s.stage, s.pooling, s.parent_for) for s in cfg.ensemble.extra_members["valence"]] == [(1, "asp", "dim")]
    assert cfg.ensemble.external == {"arousal": "baseline", "dominance": "baseline"}
    assert cfg.extract.augment == 1


def test_paper_final_and_ablation_searches():
    final = load_yaml_as(CONFIGS / "paper-final.yaml", SearchConfig)
    assert [(p.alpha, p.beta, p.pooling, p.parent_for) for p in final.stage1_points()] == [
        (0.25, 0.75, "asp", ["cat"]), (0.75, 0.25, "asp", ["dim"]), (0.75, 0.25, "mean", ["dim"])]
    assert final.cat_variants == {"lr1e-5": {"finetune.cat.lr": 1e-5}, "lr1e-6": {"finetune.cat.lr": 1e-6},
                                  "confusion": {"finetune.cat.lr": 1e-5, "loss.class_weights": "confusion"}}
    assert final.dim_parents == {"asp": 1, "mean": 1} and final.sigma == [3.0, 5.0, 7.0, None]
    ablation = load_yaml_as(CONFIGS / "ablation.yaml", SearchConfig)
    assert [(p.alpha, p.beta) for p in ablation.stage1_points()] == [(1, 0), (0, 1), (0.25, 0.75), (0.5, 0.5),
                                                                     (0.75, 0.25)]
    assert ablation.stages == [1] and ablation.overrides["train.validation"] == 0.1
    cfg = load_config(CONFIGS / "paper.yaml", ablation.overrides)
    assert (cfg.train.validation, cfg.train.use_augmented) == (0.1, False)


def test_search_points_exclude_the_product(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("base: paper.yaml\nalpha: [1]\nbeta: [1]\npooling: [asp]\npoints: [{alpha: 1, beta: 0}]\n")
    with pytest.raises(ConfigError, match="points: list the stage-1 points or give alpha/beta/pooling, not both"):
        load_yaml_as(both, SearchConfig)
    parents = tmp_path / "parents.yaml"
    parents.write_text("base: paper.yaml\npoints: [{alpha: 1, beta: 0}]\ndim_parents: {max: 1}\n")
    with pytest.raises(ConfigError, match="dim_parents: keys must be poolings"):
        load_yaml_as(parents, SearchConfig)


def test_grid_and_demo_load():
    grid = load_yaml_as(CONFIGS / "grid.yaml", SearchConfig)
    assert grid.alpha == grid.beta == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert grid.pooling == ["asp", "mean"] and grid.sigma == [None, 3.0, 5.0, 7.0]
    assert load_config(CONFIGS / "demo.yaml").model.proj_dim < 1028


def test_layer_configs_load_and_validate():
    """configs/demo-layers.yaml is the demo with every hidden state stored and a learned mix; the block of
    configs/paper.yaml that documents the switch to WavLM-large's 25 hidden states is a valid recipe."""
    layered, demo = load_config(CONFIGS / "demo-layers.yaml"), load_config(CONFIGS / "demo.yaml")
    assert [(e.name, e.layers, e.layer, e.mean_last_k) for e in layered.extract.encoders] == [
        ("wavlm", "all", -1, 1), ("whisper", "all", -1, 1), ("roberta", "all", -1, 1)]
    assert (layered.model.layer_weights, layered.model.layer_norm_per_layer, layered.model.layers) == (True, False, None)
    assert layered.model.pooling == "asp" and demo.model.layer_weights is False
    plain = to_dict(layered)
    plain["model"].update(layer_weights=False)
    for encoder in plain["extract"]["encoders"]:
        assert encoder["model"] == f"demo/encoders-deep/{encoder['name']}"     # make-test-encoders --layers 3
        encoder.update(layers=None, model=f"demo/encoders/{encoder['name']}")
    assert plain == to_dict(demo)                                   # otherwise the demo

    documented = {}
    for line in (CONFIGS / "paper.yaml").read_text().splitlines():
        found = re.fullmatch(r"\s*#\s+((?:model|extract)\.[\w.\[\]]+): (.+?)(\s+#.*)?", line)
        if found:
            documented[found.group(1)] = yaml.safe_load(found.group(2))
    assert set(documented) == {"extract.encoders[0]", "model.layer_weights", "model.layer_norm_per_layer",
                               "model.layers"}
    paper = load_config(CONFIGS / "paper.yaml")
    encoders = [to_dict(e) for e in paper.extract.encoders]
    encoders[0] = documented.pop("extract.encoders[0]")
    switched = load_config(CONFIGS / "paper.yaml", {"extract.encoders": encoders, **documented})
    wavlm = switched.extract.encoders[0]
    assert (wavlm.model, wavlm.layers, wavlm.layer) == ("microsoft/wavlm-large", "all", -1)
    assert switched.model.layer_weights and switched.model.layers == {"wavlm": [6, 12, 18, 24]}
    assert paper.model.layer_weights is False and paper.extract.encoders[0].layers is None


@pytest.mark.parametrize("key, value, message", [
    ("model.poolng", "asp", "model.poolng: unknown key"),
    ("model.pooling", "max", "model.pooling: expected one of ['asp', 'mean'], got 'max'"),
    ("train.epochs", "ten", "train.epochs: expected an integer, got 'ten'"),
    ("train.lr", True, "train.lr: expected a number"),
    ("loss.sigma", -3, "loss.sigma: must be positive"),
    ("train.batch_size", 0, "train.batch_size: must be >= 1"),
    ("finetune.cat.task", "dim", "finetune.cat.task: expected one of ['cat']"),
    ("finetune.dim.select_metric", "f1", "finetune.dim.select_metric: expected one of ['ccc_mean']"),
    ("finetune.epochs", 3, "finetune.epochs: unknown key"),
    ("train.validation", 1.5, "train.validation: must be a fraction"),
    ("loss.class_weights", "confusing", "loss.class_weights: expected one of"),
    ("loss.penalty_weight_grad", "yes", "loss.penalty_weight_grad: expected true/false, got 'yes'"),
    ("ensemble.extra_members", {"happiness": []}, "ensemble.extra_members: ['happiness'] are not attributes"),
    ("ensemble.extra_members", {"valence": [{"stage": 2, "parent_for": "dim"}]},
     "ensemble.extra_members.valence[0]: parent_for: only stage-1 grid points are parents"),
    ("ensemble.extra_members", {"valence": [{"parent_for": "multi"}]},
     "ensemble.extra_members.valence[0].parent_for: expected one of ['cat', 'dim'], got 'multi'"),
    ("ensemble.external", {"class": "baseline"}, "ensemble.external: ['class'] are not attributes"),
    ("ensemble.external", {"arousal": " "}, "ensemble.external.arousal: needs a name"),
    ("ensemble.external", ["baseline"], "ensemble.external: expected a mapping"),
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


@pytest.mark.parametrize("build, message", [
    (lambda: TrainConfig(batch_size=0), "batch_size: must be >= 1, got 0"),
    (lambda: CatFinetuneConfig(lr=1e-9, min_lr=1e-7), "lr/min_lr: need 0 <= min_lr <= lr"),
    (lambda: LossConfig(alpha=0.0, beta=0.0), "alpha/beta: need non-negative and not both 0"),
    (lambda: ModelConfig(dropout=1.0), "dropout: must be in [0, 1)"),
    (lambda: EncoderConfig("w", "speech", "x", layer=3, mean_last_k=2), "mean_last_k: cannot be combined with layer=3"),
    (lambda: ExtractConfig([EncoderConfig("w", "speech", "x")] * 2), "encoders: duplicate encoder names ['w', 'w']"),
    (lambda: AshaConfig(reduction_factor=1), "reduction_factor: must be >= 2, got 1"),
])
def test_each_section_validates_itself_when_built_directly(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(message)


def test_a_nested_section_error_names_the_full_key(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: paper.yaml\nalpha: [1]\nbeta: [1]\npooling: [asp]\nasha: {grace_period: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_yaml_as(grid, SearchConfig)
    assert str(err.value) == f"{grid}: asha.grace_period: must be >= 1, got 0"


def test_recipes_pickle_by_reference_and_the_store_config_needs_no_trainer():
    """Ray ships configs to trials by pickle (the stage-2 schedule types are built by a factory); the feature store's
    config imports neither the trainer nor torch nor Ray."""
    cfg = load_config(CONFIGS / "paper.yaml")
    assert pickle.loads(pickle.dumps(cfg)) == cfg and type(cfg.finetune.dim) is DimFinetuneConfig
    assert loaded_by(["mtser.featurestore.config"], ("mtser.trainer", "torch", "ray", "pydantic")) == []
