"""One small finished search per test session, shared by the tune / ensemble / predict / report tests.

The caller's module must have Ray initialised (conftest's `ray_module`); the run itself is built once.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = {"train.epochs": 2, "train.samples_per_epoch": 64, "train.batch_size": 16,
        **{f"finetune.{task}.{key}": value for task in ("cat", "dim")
           for key, value in (("epochs", 2), ("samples_per_epoch", 64), ("batch_size", 16))}}


def write_grid(path: Path, **changes) -> Path:
    """A 4-trial stage-1 grid (α 0.5/1 × pooling asp/mean) on configs/demo.yaml; stage 2 adds 1 cat + 1 dim trial
    (the dim parent: the best ASP point, which demo.yaml's valence ensemble adds as "the pre-trained ASP model")."""
    grid = {"base": str(REPO / "configs" / "demo.yaml"), "alpha": [0.5, 1.0], "beta": [1.0],
            "pooling": ["asp", "mean"], "sigma": [3.0], "cat_parents": 1, "dim_parents": {"asp": 1},
            "resources": {"cpu": 1.0, "gpu": 0.0}, "max_concurrent": 2, "overrides": TINY}
    grid.update(changes)
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def ray_init() -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
                 log_to_driver=False)          # "local": never join a cluster another process runs here


@functools.cache
def finished_run(store: str, root: str):
    """(run directory, SearchSummary) of the shared two-stage search on `store`."""
    from mtser.trainer.tune import run_search

    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    grid = write_grid(root_path / "grid.yaml")
    summary = run_search(grid, store, root_path / "run", verbose=0)
    return root_path / "run", summary
