"""Every knob of the recipe as typed dataclasses, and the one validating YAML loader.

`load_config(path)` reads a YAML file into `Config`; unknown keys and wrong types are errors that name the key
(`model.pooling: expected one of ['asp', 'mean'], got 'max'`). `load_yaml_as(path, cls)` does the same for any
other dataclass (the search space in `configs/grid.yaml`, for instance).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


# ----------------------------------------------------------------------------------------------------------------- schema
@dataclass
class EncoderConfig:
    """One frozen encoder whose per-frame (or per-token) states are stored."""

    name: str                                   # key in the store, e.g. "wavlm"
    kind: Literal["speech", "whisper", "text"]  # speech SSL model, Whisper encoder (+ASR), text model on transcripts
    model: str                                  # hub id or local directory, loaded with from_pretrained
    revision: str | None = None                 # hub revision; local directories are content-hashed instead
    layer: int = -1                             # hidden-state index (-1 = last layer)
    mean_last_k: int = 1                        # >1: mean of the last K layers (then `layer` must stay -1)
    layers: list[int] | Literal["all"] | None = None   # several hidden states side by side, (T, L, D) per utterance
                                                # (0 = embeddings, negative from the end); not with the two above
    dtype: Literal["float16", "float32", "int8"] = "float16"   # as stored
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # forward pass; None: bfloat16 on CUDA,
                                                                            # float32 on CPU (see resolve_compute_dtype)
    compression: Literal["none", "zstd"] = "none"
    asr: bool = False                           # whisper only: transcribe utterances that have no transcript
    pad_to_30s: bool = True                     # whisper only: pad to the 30 s the model was trained on
    max_tokens: int = 512                       # text only: truncate transcripts to this many tokens

    def __post_init__(self) -> None:
        if self.kind == "whisper" and not self.pad_to_30s:
            raise ConfigError(f"{self.name}.pad_to_30s: false is not supported (the transformers Whisper encoder "
                              "requires 3000 mel frames, i.e. 30 s)")
        if self.layers is not None and (self.layer != -1 or self.mean_last_k != 1):
            raise ConfigError(f"{self.name}.layers: cannot be combined with layer={self.layer} or mean_last_k="
                              f"{self.mean_last_k} (one stored state); list the hidden states in layers instead")
        if self.layers == []:
            raise ConfigError(f"{self.name}.layers: empty; give 'all' or a list of hidden-state indices")


def resolve_compute_dtype(enc: EncoderConfig, device: str) -> str:
    """The dtype `enc`'s forward pass runs in on `device`: as configured, else bfloat16 on CUDA, float32 on CPU."""
    if enc.compute_dtype is not None:
        return enc.compute_dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


@dataclass
class ExtractConfig:
    encoders: list[EncoderConfig]
    sample_rate: int = 16000
    batch_seconds: float = 120.0                # total audio seconds per length-sorted batch
    shard_seconds: float = 3600.0               # audio seconds per shard (the unit of work and of writing)
    augment: int = 0                            # extra augmented copies per training utterance
    augment_snr_db: tuple[float, float] = (5.0, 20.0)
    augment_gain_db: tuple[float, float] = (-5.0, 5.0)
    augment_rt60_s: tuple[float, float] = (0.2, 0.8)
    asr_language: str = "en"
    asr_max_new_tokens: int = 128
    # speech encoders: an utterance longer than window_seconds is encoded in windows of that length overlapping by
    # 2 × window_context_seconds, each keeping its central frames (self-attention over a whole recording is quadratic)
    window_seconds: float = 30.0
    window_context_seconds: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sample_rate", "batch_seconds", "shard_seconds", "asr_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.augment < 0:
            raise ConfigError(f"augment: must be >= 0, got {self.augment}")
        for name in ("augment_snr_db", "augment_gain_db", "augment_rt60_s"):
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"{name}: need low <= high, got [{low}, {high}]")


@dataclass
class ModelConfig:
    encoders: list[str] | None = None           # store encoders fed to the model, in order (None = all, sorted)
    pooling: Literal["asp", "mean"] = "asp"
    attention_dim: int = 128                    # hidden size of the attentive-statistics attention MLP
    proj_dim: int = 1028
    lstm_hidden: int = 2048
    lstm_layers: int = 2
    dropout: float = 0.0


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


@dataclass
class CatFinetuneConfig(TrainConfig):
    """Stage 2, Task 1 (classes): the paper's 20 epochs; it names no warm-up for stage 2, so none."""

    task: Literal["cat"] = "cat"
    epochs: int = 20
    lr: float = 1e-5
    warmup_epochs: float = 0.0
    select_metric: Literal["f1"] = "f1"


@dataclass
class DimFinetuneConfig(TrainConfig):
    """Stage 2, Task 2 (attributes): the paper's 30 epochs at max lr 5e-6, cosine to 1e-7, no warm-up."""

    task: Literal["dim"] = "dim"
    epochs: int = 30
    lr: float = 5e-6
    warmup_epochs: float = 0.0
    select_metric: Literal["ccc_mean"] = "ccc_mean"


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
                raise ConfigError(f"ensemble.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("extra_members", "external"):
            unknown = sorted(set(getattr(self, key)) - {"arousal", "valence", "dominance"})
            if unknown:
                raise ConfigError(f"ensemble.{key}: {unknown} are not attributes (arousal, valence, dominance)")
        blank = sorted(name for name, label in self.external.items() if not label.strip())
        if blank:
            raise ConfigError(f"ensemble.external.{blank[0]}: needs a name for the expected file, e.g. baseline")


@dataclass
class TimelineConfig:
    """`mtser predict --timeline`: how long recordings are cut into segments (defaults from MSP-Podcast, whose
    utterances are mostly 2-12 s)."""

    segment: Literal["vad", "fixed"] = "vad"    # vad: Silero VAD speech regions; fixed: a regular grid of windows
    min_segment_s: float = 2.0                  # vad: shorter pieces are widened into the surrounding non-speech
    max_segment_s: float = 12.0                 # vad: longer speech is cut at the quietest point in range
    max_pause_s: float = 0.5                    # vad: speech regions closer than this are one segment (if it fits)
    min_speech_s: float = 0.25                  # vad: shorter speech islands are ignored
    vad_threshold: float = 0.5                  # vad: Silero's speech probability threshold
    window_s: float = 4.0                       # fixed: window length
    hop_s: float = 2.0                          # fixed: window start every hop_s
    block_s: float = 60.0                       # audio decoded at a time (memory is bounded by this, not the file)
    batch_seconds: float = 60.0                 # audio seconds per encoder batch

    def __post_init__(self) -> None:
        for name in ("min_segment_s", "max_segment_s", "window_s", "hop_s", "block_s", "batch_seconds"):
            value = getattr(self, name)
            if not (value > 0 and value < float("inf")):
                raise ConfigError(f"timeline.{name}: must be a positive number of seconds, got {value}")
        for name in ("max_pause_s", "min_speech_s"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"timeline.{name}: must be >= 0 seconds, got {getattr(self, name)}")
        if not self.max_segment_s >= 2 * self.min_segment_s:
            raise ConfigError(f"timeline.max_segment_s: must be at least twice min_segment_s (so that any speech "
                              f"run can be cut into allowed pieces), got {self.max_segment_s} < "
                              f"2 × {self.min_segment_s}")
        if not 0 < self.vad_threshold < 1:
            raise ConfigError(f"timeline.vad_threshold: must be in (0, 1), got {self.vad_threshold}")
        if self.hop_s > self.window_s:
            raise ConfigError(f"timeline.hop_s: must not exceed window_s ({self.window_s}), got {self.hop_s}")


@dataclass
class Config:
    extract: ExtractConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def __post_init__(self) -> None:
        names = [e.name for e in self.extract.encoders]
        if len(set(names)) != len(names):
            raise ConfigError(f"extract.encoders: duplicate encoder names {names}")
        for i, enc in enumerate(self.extract.encoders):
            if enc.mean_last_k > 1 and enc.layer != -1:
                raise ConfigError(f"extract.encoders[{i}].mean_last_k: cannot be combined with layer={enc.layer}")
            if enc.mean_last_k < 1:
                raise ConfigError(f"extract.encoders[{i}].mean_last_k: must be >= 1, got {enc.mean_last_k}")
            if enc.asr and enc.kind != "whisper":
                raise ConfigError(f"extract.encoders[{i}].asr: only a whisper encoder can transcribe")
        window, context = self.extract.window_seconds, self.extract.window_context_seconds
        if not (math.isfinite(context) and context >= 0):
            raise ConfigError(f"extract.window_context_seconds: must be a finite number >= 0, got {context}")
        if not (math.isfinite(window) and window > 2 * context):
            raise ConfigError(f"extract.window_seconds: must be finite and longer than 2 × window_context_seconds "
                              f"({2 * context:g} s), got {window}")
        for key, tc in (("train", self.train), ("finetune.cat", self.finetune.cat), ("finetune.dim", self.finetune.dim)):
            for name in ("epochs", "samples_per_epoch", "batch_size", "eval_batch_size"):
                if getattr(tc, name) < 1:
                    raise ConfigError(f"{key}.{name}: must be >= 1, got {getattr(tc, name)}")
            if not 0 < tc.lr or tc.min_lr < 0 or tc.min_lr > tc.lr:
                raise ConfigError(f"{key}.lr/min_lr: need 0 <= min_lr <= lr and lr > 0, got {tc.lr}/{tc.min_lr}")
            for name, low in (("warmup_epochs", 0), ("weight_decay", 0), ("prefetch_batches", 1),
                              ("length_buckets", 1), ("nonfinite_patience", 1)):
                if getattr(tc, name) < low:
                    raise ConfigError(f"{key}.{name}: must be >= {low}, got {getattr(tc, name)}")
            if tc.grad_clip <= 0:
                raise ConfigError(f"{key}.grad_clip: must be > 0, got {tc.grad_clip}")
            if tc.validation is not None and not 0 < tc.validation < 1:
                raise ConfigError(f"{key}.validation: must be a fraction in (0, 1) or null, got {tc.validation}")
        for name in ("attention_dim", "proj_dim", "lstm_hidden", "lstm_layers"):
            if getattr(self.model, name) < 1:
                raise ConfigError(f"model.{name}: must be >= 1, got {getattr(self.model, name)}")
        if not 0 <= self.model.dropout < 1:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.model.dropout}")
        weights = self.loss.class_weights
        if isinstance(weights, list) and (len(weights) != 8 or min(weights) < 0):
            raise ConfigError(f"loss.class_weights: need 8 non-negative values (A,S,H,U,F,D,C,N), got {shown(weights)}")
        if self.model.encoders is not None:
            unknown = sorted(set(self.model.encoders) - set(names))
            if unknown:
                raise ConfigError(f"model.encoders: {unknown} not among extract.encoders {names}")
        if self.loss.alpha < 0 or self.loss.beta < 0 or self.loss.alpha + self.loss.beta == 0:
            raise ConfigError(f"loss.alpha/beta: need non-negative and not both 0, got {self.loss.alpha}/{self.loss.beta}")
        if self.loss.sigma is not None and self.loss.sigma <= 0:
            raise ConfigError(f"loss.sigma: must be positive or null, got {self.loss.sigma}")

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


@dataclass
class TrialResources:
    cpu: float = 1.0
    gpu: float = 0.0                            # fractional GPUs share one device; ignored where none exist


@dataclass
class AshaConfig:
    grace_period: int = 1                       # epochs before a member may be stopped (the first milestone)
    reduction_factor: int = 2                   # at each milestone (grace·rf^k epochs) the best 1/rf go on

    def __post_init__(self) -> None:
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError(f"asha: need grace_period >= 1 and reduction_factor >= 2, got "
                              f"{self.grace_period}/{self.reduction_factor}")


@dataclass
class GridPoint:
    """One stage-1 point of a search listed explicitly (instead of the α × β × pooling product)."""

    alpha: float
    beta: float
    pooling: Literal["asp", "mean"] = "asp"
    parent_for: list[Literal["cat", "dim"]] = field(default_factory=lambda: ["cat", "dim"])  # stage-2 parent pools


@dataclass
class SearchConfig:
    """The Ray Tune search of `mtser tune` (configs/grid.yaml, configs/paper-final.yaml, configs/ablation.yaml)."""

    base: str                                   # recipe config the grid varies, relative to the search file
    alpha: list[float] = field(default_factory=list)   # stage 1: the α × β × pooling product ...
    beta: list[float] = field(default_factory=list)
    pooling: list[Literal["asp", "mean"]] = field(default_factory=list)
    points: list[GridPoint] = field(default_factory=list)  # ... or these points (not both)
    stages: list[Literal[1, 2]] = field(default_factory=lambda: [1, 2])
    sigma: list[float | None] = field(default_factory=lambda: [None])  # stage 2 attributes; null = plain MSE
    cat_parents: int = 1                        # best stage-1 points (by selection macro-F1) fine-tuned for classes
    dim_parents: int | dict[str, int] = 2       # best stage-1 points by mean CCC, or a count per pooling
    # Task-1 fine-tunings of each cat parent: name -> recipe overrides (the paper's three: lr 1e-5, lr 1e-6, confusion)
    cat_variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"base": {}})
    resources: TrialResources = field(default_factory=TrialResources)
    max_concurrent: int = 0                     # 0: as many as the resources allow (trials = cohorts)
    cohort_size: int | None = None              # grid points per cohort (one fused model); null: by memory
    cohort_memory_gb: float = 16.0              # cohort_size null: members whose estimated training memory fits
    asha: AshaConfig | None = None              # optional successive halving of the members inside each cohort
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted recipe keys applied to every trial

    def __post_init__(self) -> None:
        product = [key for key in ("alpha", "beta", "pooling") if getattr(self, key)]
        if self.points and product:
            raise ConfigError(f"points: list the stage-1 points or give alpha/beta/pooling, not both (got {product})")
        if not self.points:
            for key in ("alpha", "beta", "pooling"):
                if not getattr(self, key):
                    raise ConfigError(f"{key}: must list at least one value (or give `points`)")
        weights = [("alpha", v) for v in self.alpha] + [("beta", v) for v in self.beta]
        weights += [(f"points[{i}]", v) for i, p in enumerate(self.points) for v in (p.alpha, p.beta)]
        bad = [f"{key}={v}" for key, v in weights if v < 0]
        if bad:
            raise ConfigError(f"weights must be non-negative, got {shown(bad)}")
        if self.points:
            zero = [i for i, p in enumerate(self.points) if p.alpha + p.beta == 0]
            if zero:
                raise ConfigError(f"points[{zero[0]}]: alpha and beta are both 0")
        elif not any(a + b > 0 for a in self.alpha for b in self.beta):
            raise ConfigError("alpha/beta: every combination has both weights 0")
        if not self.stages:
            raise ConfigError("stages: must list 1, 2 or both")
        if 2 in self.stages and not self.sigma:
            raise ConfigError("sigma: must list at least one value (null = plain MSE)")
        if self.cohort_size is not None and self.cohort_size < 1:
            raise ConfigError(f"cohort_size: must be >= 1 or null, got {self.cohort_size}")
        if self.cohort_memory_gb <= 0:
            raise ConfigError(f"cohort_memory_gb: must be positive, got {self.cohort_memory_gb}")
        bad_sigma = [s for s in self.sigma if s is not None and s <= 0]
        if bad_sigma:
            raise ConfigError(f"sigma: must be positive or null, got {shown(bad_sigma)}")
        if isinstance(self.dim_parents, dict):
            unknown = sorted(set(self.dim_parents) - {"asp", "mean"})
            if unknown:
                raise ConfigError(f"dim_parents: keys must be poolings (asp, mean), got {unknown}")
        counts = self.dim_parents.values() if isinstance(self.dim_parents, dict) else [self.dim_parents]
        if self.cat_parents < 0 or min(counts, default=0) < 0:
            raise ConfigError("cat_parents/dim_parents: counts must be >= 0")
        for name in self.cat_variants:
            if not name or not all(ch.isalnum() or ch in "-." for ch in name):
                raise ConfigError(f"cat_variants.{name}: names may hold letters, digits, '-' and '.' only")

    def stage1_points(self) -> list[GridPoint]:
        """The stage-1 points in grid order: `points`, or the α × β × pooling product without (0, 0)."""
        if self.points:
            return list(self.points)
        return [GridPoint(a, b, p) for p in self.pooling for a in self.alpha for b in self.beta if a + b > 0]


# ----------------------------------------------------------------------------------------------------------------- loader
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


def model_candidates(model: str, config_dir: Path) -> list[Path]:
    """The folders a config's encoder `model` may name, in the order they are tried: an absolute path itself; a
    relative one beside the config file, then in the current directory."""
    path = Path(model).expanduser()
    return [path] if path.is_absolute() else [config_dir.absolute() / path, Path.cwd() / path]


MAX_CONFIG_BYTES = 1 << 20        # a recipe is a few KB; anything near this is not a config
MAX_CONFIG_VALUES = 100_000       # values after YAML aliases are expanded (an "alias bomb" expands to billions)
MAX_SHOWN = 80                    # characters of a value echoed into an error message


def load_yaml_as(path: str | Path, cls: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Load and validate a YAML file as dataclass `cls`; every problem is a ConfigError naming the file."""
    path = Path(path)
    raw = parse_yaml(_read_text(path), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        apply_override(raw, dotted, value)
    try:
        return from_dict(cls, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too large for a config (at most {MAX_CONFIG_BYTES})")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def parse_yaml(text: str, where: str) -> Any:
    """Safe-load YAML text (no Python objects), refusing documents whose aliases expand to more than
    MAX_CONFIG_VALUES values or that nest too deeply; errors name `where` and never echo a long value."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_cut(' '.join(str(exc).split()), 300)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    _check_expanded_size(data, where)
    return data


def _check_expanded_size(data: Any, where: str) -> None:
    """Count values as if every alias were copied out (shared nodes count each time they are reached), stopping
    at MAX_CONFIG_VALUES: linear in the limit however large the expansion."""
    stack, count = [data], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_CONFIG_VALUES} values (YAML aliases?); "
                              "not a config")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def shown(value: Any) -> str:
    """`value` as a message quotes it: its repr, cut to MAX_SHOWN characters."""
    return _cut(repr(value), MAX_SHOWN)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit - 15]}... ({len(text)} chars)"


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    _check_expanded_size(value, dotted)
    node[last] = value


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain JSON/YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types with the key's dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0][:MAX_SHOWN])}: unknown key (allowed: {sorted(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        kwargs[name] = _coerce(hints[name], data[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where + ': ' if where else ''}{exc}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc).split(": ", 1)[-1])
        raise ConfigError(f"{key}: {' or '.join(errors)}")
    if tp is type(None):
        if value is None or value == "none":
            return None
        raise ConfigError(f"{key}: expected null, got {shown(value)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {shown(value)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {shown(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {shown(value)}")
        if args[0] is str and not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: keys must be strings, got {shown(list(value))}")
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "2e-5" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {shown(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return number
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {shown(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {shown(value)}")
    raise ConfigError(f"{key}: unsupported type {tp}")
