"""The trainer's recipe as typed dataclasses: model, loss, schedules, ensembles, and `Config`, the whole recipe.

`load_config(path)` reads a recipe YAML file into `Config` through the generic loader (`mtser.configio`); its
`extract` section is the feature store's `ExtractConfig`. Each section checks its own values; `Config` checks only
what relates sections to each other. Imports no torch and no Ray.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mtser.configio import ConfigError, load_yaml_as, shown
from mtser.featurestore.config import EncoderConfig, ExtractConfig, model_candidates
from mtser.featurestore.labels import ATTRIBUTES


@dataclass
class ModelConfig:
    encoders: list[str] | None = None           # store encoders fed to the model, in order (None = all, sorted)
    pooling: Literal["asp", "mean"] = "asp"
    attention_dim: int = 128                    # hidden size of the attentive-statistics attention MLP
    proj_dim: int = 1028
    lstm_hidden: int = 2048
    lstm_layers: int = 2
    dropout: float = 0.0
    layer_weights: bool = False                 # learn a softmax mix of each encoder's stored layers (layer_mix.py)
    layer_norm_per_layer: bool = False          # layer-normalise each layer's frames before the mix
    layers: dict[str, list[int]] | None = None  # per encoder, the stored hidden-state indices read (None: all stored)

    def __post_init__(self) -> None:
        for name in ("attention_dim", "proj_dim", "lstm_hidden", "lstm_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", name)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"must be in [0, 1), got {self.dropout}", "dropout")
        if self.layer_norm_per_layer and not self.layer_weights:
            raise ConfigError("normalises the layers before a learned mix: needs layer_weights: true",
                              "layer_norm_per_layer")
        for name, indices in (self.layers or {}).items():
            if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
                raise ConfigError(f"need distinct hidden-state indices >= 0 (as `mtser features ls` prints them), "
                                  f"got {shown(indices)}", f"layers.{name}")
            if len(indices) > 1 and not self.layer_weights:
                raise ConfigError(f"{len(indices)} layers need a learned mix (model.layer_weights: true); "
                                  "without it name one layer", f"layers.{name}")


@dataclass
class LossConfig:
    alpha: float = 1.0                          # weight of the attribute (regression) loss
    beta: float = 1.0                           # weight of the class (weighted CE) loss
    # auto: multi-task = inverse training frequency, cat fine-tuning = plain CE; confusion (stage 2): from the parent's
    # confusion matrix on its selection split (losses.class_weights_from_confusion); or 8 explicit weights
    class_weights: Literal["auto", "none", "confusion"] | list[float] = "auto"
    sigma: float | None = None                  # stage 2 attributes: Gaussian-penalty width (None = plain MSE)
    sigma_mu: float = 4.0
    # the gradient flows through the penalty weight exp(−(ŷ−μ)²/2σ²) too (the formula differentiated as written);
    # false: the weight is a constant per step (detached), only the squared error is differentiated
    penalty_weight_grad: bool = True

    def __post_init__(self) -> None:
        weights = self.class_weights
        if isinstance(weights, list) and (len(weights) != 8 or min(weights) < 0):
            raise ConfigError(f"need 8 non-negative values (A,S,H,U,F,D,C,N), got {shown(weights)}", "class_weights")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0:
            raise ConfigError(f"need non-negative and not both 0, got {self.alpha}/{self.beta}", "alpha/beta")
        if self.sigma is not None and self.sigma <= 0:
            raise ConfigError(f"must be positive or null, got {self.sigma}", "sigma")


@dataclass
class TrainConfig:
    task: Literal["multi", "cat", "dim"] = "multi"
    epochs: int = 50
    samples_per_epoch: int = 32000
    batch_size: int = 128
    eval_batch_size: int = 256
    lr: float = 2e-5
    min_lr: float = 1e-7
    warmup_epochs: float = 3.0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mixed_precision: bool = True                # GPU only; CPU always computes in float32
    select_metric: Literal["f1", "ccc_mean", "score"] = "score"  # score = f1 + ccc_mean
    prefetch_batches: int = 4
    length_buckets: int = 1                     # >1: sort each window of this many batches by length (less padding)
    nonfinite_patience: int = 10                # consecutive non-finite training losses before a model is dropped
    validation: float | None = None             # hold out this fraction of Train (by speaker) to select on; then
                                                # Development is the test split (the paper's ablation: 0.1)
    use_augmented: bool = True                  # train on the store's augmented copies of Train utterances too
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        for name in ("epochs", "samples_per_epoch", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", name)
        if not 0 < self.lr or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got {self.lr}/{self.min_lr}", "lr/min_lr")
        for name, low in (("warmup_epochs", 0), ("weight_decay", 0), ("prefetch_batches", 1), ("length_buckets", 1),
                          ("nonfinite_patience", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"must be >= {low}, got {getattr(self, name)}", name)
        if self.grad_clip <= 0:
            raise ConfigError(f"must be > 0, got {self.grad_clip}", "grad_clip")
        if self.validation is not None and not 0 < self.validation < 1:
            raise ConfigError(f"must be a fraction in (0, 1) or null, got {self.validation}", "validation")


def _stage2_schedule(task: str, select_metric: str, epochs: int, lr: float, doc: str) -> type[TrainConfig]:
    """A stage-2 schedule: TrainConfig with `task` and `select_metric` fixed (any other value is refused), the
    paper's `epochs` and max `lr`, and no warm-up (the paper names none for stage 2)."""
    return dataclasses.make_dataclass(
        f"{task.capitalize()}FinetuneConfig",
        [("task", Literal[task], task), ("epochs", int, epochs), ("lr", float, lr), ("warmup_epochs", float, 0.0),
         ("select_metric", Literal[select_metric], select_metric)],
        bases=(TrainConfig,), namespace={"__module__": __name__, "__doc__": doc})


CatFinetuneConfig = _stage2_schedule("cat", "f1", 20, 1e-5, "Stage 2, Task 1 (classes): the paper's 20 epochs.")
DimFinetuneConfig = _stage2_schedule("dim", "ccc_mean", 30, 5e-6,
                                     "Stage 2, Task 2 (attributes): the paper's 30 epochs at max lr 5e-6, cosine to "
                                     "1e-7.")


@dataclass
class FinetuneConfig:
    """Stage 2: one full schedule per task (`mtser finetune --task cat|dim` and the search take the task's)."""

    cat: CatFinetuneConfig = field(default_factory=CatFinetuneConfig)
    dim: DimFinetuneConfig = field(default_factory=DimFinetuneConfig)


@dataclass
class MemberSelector:
    """A finished grid point forced into an attribute's ensemble: the best one matching these fields by that
    attribute's development CCC. `parent_for: dim` keeps the stage-1 points the search fine-tuned for that task (the
    paper adds to valence "the pre-trained model that incorporated attention pooling": the ASP Task-2 parent)."""

    stage: Literal[1, 2] = 1
    pooling: Literal["asp", "mean"] | None = None
    task: Literal["multi", "cat", "dim"] | None = None
    parent_for: Literal["cat", "dim"] | None = None

    def __post_init__(self) -> None:
        if self.parent_for is not None and self.stage != 1:
            raise ConfigError(f"parent_for: only stage-1 grid points are parents of fine-tunings, "
                              f"got stage {self.stage}")


@dataclass
class EnsembleConfig:
    """The paper's ensembles: one Task-1 model; per attribute the 3 best Task-2 fine-tunings, plus forced members."""

    class_top_k: int = 1
    attribute_top_k: int = 3
    class_from: Literal["all", "cat"] = "cat"         # cat: Task-1 fine-tunings only
    attribute_from: Literal["all", "dim"] = "dim"     # dim: Task-2 fine-tunings only
    extra_members: dict[str, list[MemberSelector]] = field(default_factory=dict)  # attribute -> forced members
    # attribute -> name of an external prediction file the recipe expects (`mtser ensemble --extra-member`); one
    # not given is reported and recorded, not an error (the paper: {arousal: baseline, dominance: baseline})
    external: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("class_top_k", "attribute_top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key)
        for key in ("extra_members", "external"):
            unknown = sorted(set(getattr(self, key)) - set(ATTRIBUTES))
            if unknown:
                raise ConfigError(f"{unknown} are not attributes ({', '.join(ATTRIBUTES)})", key)
        blank = sorted(name for name, label in self.external.items() if not label.strip())
        if blank:
            raise ConfigError("needs a name for the expected file, e.g. baseline", f"external.{blank[0]}")


@dataclass
class Config:
    """The whole recipe: what is extracted, the model, the loss, both stages' schedules and the ensembles."""

    extract: ExtractConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def __post_init__(self) -> None:
        names = [e.name for e in self.extract.encoders]
        unknown = sorted(set(self.model.encoders or ()) - set(names))
        if unknown:
            raise ConfigError(f"{unknown} not among extract.encoders {names}", "model.encoders")
        unknown = sorted(set(self.model.layers or ()) - set(names))
        if unknown:
            raise ConfigError(f"{unknown} not among extract.encoders {names}", "model.layers")

    def schedule(self, stage: Literal["pretrain", "finetune"], task: str | None = None) -> TrainConfig:
        """The schedule a model trains with: `train` for stage 1, the task's `finetune` section for stage 2."""
        if stage == "pretrain":
            return self.train
        if task not in ("cat", "dim"):
            raise ConfigError(f"finetune: the task must be cat or dim, got {task!r}")
        return getattr(self.finetune, task)

    def encoder(self, name: str) -> EncoderConfig:
        for enc in self.extract.encoders:
            if enc.name == name:
                return enc
        raise ConfigError(f"no encoder named {name!r} in extract.encoders")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a recipe config; `overrides` maps dotted keys (``"loss.alpha"``) to values.

    An encoder `model` that is a relative path naming a folder beside the config file becomes that folder's absolute
    path; any other value is kept as written (a folder relative to the current directory, or a hub id):
    `model_candidates` lists where such a path is looked for."""
    cfg = load_yaml_as(path, Config, overrides)
    for enc in cfg.extract.encoders:
        beside = model_candidates(enc.model, Path(path).parent)[0]
        if beside.is_dir() and not Path(enc.model).expanduser().is_absolute():
            enc.model = str(beside.resolve())
    return cfg
