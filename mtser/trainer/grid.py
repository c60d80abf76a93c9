"""The search's grid points and cohorts, typed: stage-1 points from the search, stage-2 fine-tunings of the best
stage-1 points, and the grouping of points that can train together as one fused model (`loop.train_cohort`).

Pure planning: no Ray, no torch. Each point carries its full recipe as a `Config`; `tune.py` turns cohorts into
plain data only where Ray Tune needs it (the trial's parameters) and back in the trial.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from mtser.configio import ConfigError, to_dict
from mtser.trainer.config import Config, TrainConfig, load_config
from mtser.trainer.runs import FINISHED
from mtser.trainer.search_config import SearchConfig, architecture


@dataclass
class TrialSpec:
    """One grid point of either stage; `config` is the full recipe the trainer receives."""

    stage: int
    name: str
    alpha: float
    beta: float
    pooling: str
    task: str
    config: Config
    sigma: float | None = None
    parent: str | None = None
    init_from: str | None = None
    axes: dict[str, Any] = field(default_factory=dict)    # its stage-1 point's grid axes (model.layers, ...)

    @property
    def schedule(self) -> TrainConfig:
        """The schedule this point trains with (`Config.schedule` of its stage and task)."""
        return self.config.schedule("pretrain" if self.stage == 1 else "finetune", self.task)


@dataclass
class CohortSpec:
    """Grid points trained together as one fused model in one Ray Tune trial."""

    stage: int
    name: str
    members: list[TrialSpec]


def trial_config(base: Path, search: SearchConfig, overrides: dict[str, Any], device: str) -> Config:
    """The recipe `base` with the search's overrides, then `overrides`, every schedule on `device`."""
    devices = {f"{section}.device": device for section in ("train", "finetune.cat", "finetune.dim")}
    return load_config(base, {**search.overrides, **overrides, **devices})


def stage1_specs(search: SearchConfig, base: Path, device: str) -> list[TrialSpec]:
    """The stage-1 points (`SearchConfig.stage1_points`); a recipe its axes make invalid is a ConfigError naming the
    point."""
    specs = []
    for p in search.stage1_points():
        try:
            cfg = trial_config(base, search, {"loss.alpha": p.alpha, "loss.beta": p.beta, "model.pooling": p.pooling,
                                              "train.task": "multi", **p.axes}, device)
        except ConfigError as exc:
            raise ConfigError(f"grid point {p.name}: {exc}") from None
        specs.append(TrialSpec(1, p.name, p.alpha, p.beta, p.pooling, "multi", cfg, axes=p.axes))
    return specs


def stage2_parents(search: SearchConfig, stage1: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The stage-1 points each task fine-tunes: `cat_parents` best by selection macro-F1; `dim_parents` best by
    mean CCC (overall, or a count per pooling: the paper's best ASP and best mean-pooling models). Only finished
    points that their `parent_for` allows."""
    done = stage1[stage1["status"].isin(FINISHED) & stage1["checkpoint"].notna()]
    allowed = {p.name: p.parent_for for p in search.stage1_points()}

    def best(task: str, metric: str, rows: pd.DataFrame, count: int) -> pd.DataFrame:
        rows = rows[[task in allowed.get(t, ("cat", "dim")) for t in rows["trial"]]]
        return rows.sort_values([metric, "trial"], ascending=[False, True]).head(count)

    dim = search.dim_parents
    if isinstance(dim, dict):
        dim_rows = pd.concat([best("dim", "ccc_mean", done[done["pooling"] == pooling], n) for pooling, n in dim.items()])
    else:
        dim_rows = best("dim", "ccc_mean", done, dim)
    return {"cat": best("cat", "f1", done, search.cat_parents), "dim": dim_rows}


def stage2_specs(search: SearchConfig, base: Path, device: str, stage1: pd.DataFrame) -> list[TrialSpec]:
    """Per cat parent, one grid point per `cat_variants` entry; per dim parent, one per σ. Each inherits its
    parent's α, β, pooling and grid axes (the architecture it fine-tunes)."""
    axes = {p.name: p.axes for p in search.stage1_points()}
    specs = []
    for task, parents in stage2_parents(search, stage1).items():
        for _, parent in parents.iterrows():
            fixed = axes.get(parent["trial"], {})
            inherited = {"loss.alpha": parent["alpha"], "loss.beta": parent["beta"], "model.pooling": parent["pooling"],
                         **fixed}
            if task == "cat":
                variants = [(f"cat-{name}", None, {**inherited, "loss.sigma": None, **changes})
                            for name, changes in search.cat_variants.items()]
            else:
                variants = [(f"dim_{'mse' if sigma is None else f's{sigma:g}'}", sigma, {**inherited, "loss.sigma": sigma})
                            for sigma in search.sigma]
            for tag, sigma, overrides in variants:
                specs.append(TrialSpec(2, f"{tag}__{parent['trial']}", float(parent["alpha"]), float(parent["beta"]),
                                       str(parent["pooling"]), task, trial_config(base, search, overrides, device),
                                       sigma=sigma, parent=str(parent["trial"]), init_from=str(parent["checkpoint"]),
                                       axes=fixed))
    return specs


def cohort_key(spec: TrialSpec) -> str:
    """Grid points with equal keys can share a cohort: one architecture, one batch stream, one parent, one task."""
    from mtser.trainer.loop import SHARED_FIELDS

    return json.dumps({"model": to_dict(spec.config.model),
                       "schedule": {f: getattr(spec.schedule, f) for f in SHARED_FIELDS},
                       "stage": spec.stage, "task": spec.task, "init_from": spec.init_from}, sort_keys=True)


def group_cohorts(specs: list[TrialSpec], size_of: Callable[[TrialSpec], int]) -> list[CohortSpec]:
    """Cohorts of `specs` in grid order: grouped by `cohort_key`, split into chunks of `size_of(first spec)`."""
    groups: dict[str, list[TrialSpec]] = {}
    for spec in specs:
        groups.setdefault(cohort_key(spec), []).append(spec)
    cohorts, labels = [], {}
    for members in groups.values():
        first = members[0]
        label = architecture(first.pooling, first.axes) if first.stage == 1 else f"{first.task}__{first.parent}"
        size = size_of(first)
        for k in range(0, len(members), size):
            n = labels[label] = labels.get(label, -1) + 1
            cohorts.append(CohortSpec(first.stage, f"{label}-c{n}", members[k:k + size]))
    return cohorts
