"""The Ray Tune search of `mtser tune` as typed dataclasses (configs/grid.yaml, configs/paper-final.yaml,
configs/ablation.yaml), loaded with `mtser.configio.load_yaml_as(path, SearchConfig)`; each checks its own values."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from mtser.configio import ConfigError, shown

AXES = ("model.layer_weights", "model.layers")  # recipe keys a search may vary as stage-1 grid axes
ENCODER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")    # a store's encoder names (featurestore.layout)


@dataclass
class TrialResources:
    """Ray resources of one trial (one cohort)."""

    cpu: float = 1.0
    gpu: float = 0.0                            # fractional GPUs share one device; ignored where none exist


@dataclass
class AshaConfig:
    """Successive halving of the members inside each cohort (`loop.train_cohort`)."""

    grace_period: int = 1                       # epochs before a member may be stopped (the first milestone)
    reduction_factor: int = 2                   # at each milestone (grace·rf^k epochs) the best 1/rf go on

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise ConfigError(f"must be >= 1, got {self.grace_period}", "grace_period")
        if self.reduction_factor < 2:
            raise ConfigError(f"must be >= 2, got {self.reduction_factor}", "reduction_factor")


@dataclass
class GridPoint:
    """One stage-1 point of a search listed explicitly (instead of the α × β × pooling product)."""

    alpha: float
    beta: float
    pooling: Literal["asp", "mean"] = "asp"
    parent_for: list[Literal["cat", "dim"]] = field(default_factory=lambda: ["cat", "dim"])  # stage-2 parent pools
    axes: dict[str, Any] = field(default_factory=dict)      # this point's value of AXES keys (model.layers, ...)

    def __post_init__(self) -> None:
        for key, value in self.axes.items():
            axis_token(key, value, f"axes.{key}")

    @property
    def name(self) -> str:
        """The point's folder name in the run: `a<α>_b<β>_<pooling>`, then a token per axis (`axis_tag`)."""
        return f"a{self.alpha:g}_b{self.beta:g}_{self.pooling}{axis_tag(self.axes)}"


def axis_token(key: str, value: Any, where: str) -> str:
    """The point-name token of one axis value, filesystem-safe: `lw=on`/`lw=off` for model.layer_weights,
    `layers=all` (null) or `layers=<enc>.<i>-<j>..._<enc>...` (encoders sorted) for model.layers; ConfigError naming
    `where` for a key that is no axis or a value of the wrong shape."""
    check_axis(key, where)
    if key == "model.layer_weights":
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {shown(value)}", where)
        return f"lw={'on' if value else 'off'}"
    if key == "model.layers":
        if value is None:
            return "layers=all"
        if not (isinstance(value, dict) and value and all(
                isinstance(e, str) and ENCODER_NAME.fullmatch(e) and isinstance(v, list) and v
                and all(type(i) is int and i >= 0 for i in v) for e, v in value.items())):
            raise ConfigError("expected null (all stored layers) or a mapping encoder -> [hidden-state indices >= 0], "
                              f"got {shown(value)}", where)
    return "layers=" + "_".join(f"{e}.{'-'.join(map(str, value[e]))}" for e in sorted(value))


def check_axis(key: str, where: str) -> None:
    if key not in AXES:
        raise ConfigError(f"not a grid axis (the axes: {', '.join(AXES)})", where)


def axis_tag(axes: dict[str, Any]) -> str:
    """`_<token>` per axis in AXES order ('' without axes: the names of searches without axes are unchanged)."""
    return "".join(f"_{axis_token(key, axes[key], key)}" for key in AXES if key in axes)


def architecture(pooling: str, axes: dict[str, Any]) -> str:
    """What the stage-1 points of one architecture are called (their cohorts' names): `asp`, `asp_lw=on`, ..."""
    return f"{pooling}{axis_tag(axes)}"


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
    # Further stage-1 grid axes: AXES key -> values; every stage-1 point (product or listed) at every combination
    axes: dict[str, list[Any]] = field(default_factory=dict)

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
        for key, values in self.axes.items():
            check_axis(key, f"axes.{key}")
            if not values:
                raise ConfigError("must list at least one value", f"axes.{key}")
            for i, value in enumerate(values):
                axis_token(key, value, f"axes.{key}[{i}]")
        fixed = sorted({k for p in self.points for k in p.axes} & set(self.axes))
        if fixed:
            raise ConfigError(f"{fixed[0]}: set by listed points and varied by axes; do one or the other", "axes")
        names = [p.name for p in self.stage1_points()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"stage-1 points share the name {twice[0]} (a value listed twice?)")

    def stage1_points(self) -> list[GridPoint]:
        """The stage-1 points in grid order: `points`, or the α × β × pooling product without (0, 0), each at every
        combination of `axes` (the points of one combination next to each other)."""
        combos = [dict(zip(self.axes, values)) for values in itertools.product(*self.axes.values())]
        if self.points:
            return [GridPoint(p.alpha, p.beta, p.pooling, p.parent_for, {**p.axes, **c}) for c in combos
                    for p in self.points]
        return [GridPoint(a, b, p, axes=c) for p in self.pooling for c in combos for a in self.alpha for b in self.beta
                if a + b > 0]

