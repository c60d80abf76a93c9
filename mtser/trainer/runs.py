"""The run folder of a search: where each grid point's output lives, its state file, the results table, and the
one atomic-write helper everything in a run folder is written with.

    RUN/search.json              the search, the resolved base config and the store it ran on
    RUN/stage<k>/<trial>/        a grid point: best/ (checkpoint), history.csv, state.json
    RUN/ray/stage<k>-<n>/        Ray Tune's own experiment folders (TensorBoard event files, progress.csv)
    RUN/results.csv              one row per grid point (RESULT_COLUMNS)

A grid point's `state.json` is rewritten atomically after every epoch of its cohort; it counts as finished once
its status is `complete` (all epochs) or `stopped` (successive halving stopped it).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

METRIC_COLUMNS = ["f1", "ccc_arousal", "ccc_valence", "ccc_dominance", "ccc_mean", "challenge_f1",
                  "challenge_ccc_mean"]                   # on the selection split, at the best epoch
TEST_COLUMNS = [f"test_{m}" for m in METRIC_COLUMNS]      # on Development when the selection split was held out
RESULT_COLUMNS = ["stage", "trial", "cohort", "alpha", "beta", "pooling", "sigma", "task", "parent", "status",
                  "best_epoch", *METRIC_COLUMNS, *TEST_COLUMNS, "checkpoint"]
FINISHED = ("complete", "stopped")
RESULTS = "results.csv"


class RunError(RuntimeError):
    """A run folder is missing what the caller needs (the message says what and how to make it)."""


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary sibling, then rename it over `path`: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=_jsonable)))


def write_csv_atomic(table: pd.DataFrame, path: Path, float_format: str | None = None) -> None:
    write_atomic(path, lambda tmp: table.to_csv(tmp, index=False, float_format=float_format))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def trial_dir(run_dir: Path, stage: int, name: str) -> Path:
    return Path(run_dir) / f"stage{stage}" / name


def read_state(run_dir: Path, stage: int, name: str) -> dict[str, Any]:
    try:
        return json.loads((trial_dir(run_dir, stage, name) / "state.json").read_text())
    except (OSError, ValueError):
        return {"status": "pending"}


def mark_state(path_dir: Path, **changes: Any) -> None:
    """Update a grid point's state.json (created with its folder when missing)."""
    path_dir.mkdir(parents=True, exist_ok=True)
    state_path = path_dir / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {}
    state.update(changes)
    write_json_atomic(state_path, state)


def is_finished(run_dir: Path, stage: int, name: str) -> bool:
    return read_state(run_dir, stage, name).get("status") in FINISHED


def results_table(run_dir: Path, points: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per grid point (`points`: stage, name, alpha, beta, pooling, sigma, task, parent) from its state."""
    rows = []
    for p in points:
        state = read_state(run_dir, p["stage"], p["name"])
        metrics = state.get("best_metrics") or {}
        tested = state.get("test_metrics") or {}
        rows.append({"stage": p["stage"], "trial": p["name"], "cohort": state.get("cohort"), "alpha": p["alpha"],
                     "beta": p["beta"], "pooling": p["pooling"], "sigma": p["sigma"], "task": p["task"],
                     "parent": p["parent"], "status": state.get("status", "pending"),
                     "best_epoch": state.get("best_epoch"), **{m: metrics.get(m, math.nan) for m in METRIC_COLUMNS},
                     **{f"test_{m}": tested.get(m, math.nan) for m in METRIC_COLUMNS},
                     "checkpoint": state.get("checkpoint")})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def load_results(run_dir: str | Path) -> pd.DataFrame:
    path = Path(run_dir) / RESULTS
    if not path.exists():
        raise RunError(f"{run_dir}: no {RESULTS} (run `mtser tune ... --out {run_dir}` first)")
    return pd.read_csv(path)


def load_search_record(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "search.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise RunError(f"{run_dir}: no search.json (not a run folder of `mtser tune`)") from None
