"""The run folder of a search: where each grid point's output lives, its state file, the results table, and the
one atomic-write helper everything in a run folder is written with. A run folder is a local path or any fsspec URL
(`s3://bucket/run`); `RunFolder` is the one place that maps its paths to a filesystem.

    RUN/search.json              the search, the resolved base config and the store it ran on
    RUN/stage<k>/<trial>/        a grid point: best/ (checkpoint), history.csv, state.json
    RUN/ray/stage<k>-<n>/        Ray Tune's own experiment folders (TensorBoard event files, progress.csv)
    RUN/results.csv              one row per grid point (RESULT_COLUMNS)

A grid point's `state.json` is rewritten atomically after every epoch of its cohort (it names the node and process
id of the trial training it); it counts as finished once its status is `complete` (all epochs) or `stopped`
(successive halving stopped it). On an object store a trial
trains in a node-local work folder and uploads history and checkpoint before its state names them, so nothing in
the run folder assumes a disk that every node sees.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd

from mtser.errors import MtserError
from mtser.featurestore.files import absolute, is_url
from mtser.trainer.search_config import axis_tag

METRIC_COLUMNS = ["f1", "ccc_arousal", "ccc_valence", "ccc_dominance", "ccc_mean", "challenge_f1",
                  "challenge_ccc_mean"]                   # on the selection split, at the best epoch
TEST_COLUMNS = [f"test_{m}" for m in METRIC_COLUMNS]      # on Development when the selection split was held out
RESULT_COLUMNS = ["stage", "trial", "cohort", "alpha", "beta", "pooling", "axes", "sigma", "task", "parent", "status",
                  "best_epoch", *METRIC_COLUMNS, *TEST_COLUMNS, "layer_entropy", "checkpoint"]
FINISHED = ("complete", "stopped")
RESULTS = "results.csv"


class RunError(MtserError, RuntimeError):
    """A run folder is missing what the caller needs (the message says what and how to make it)."""


def write_atomic(location: str | Path, data: bytes, storage_options: dict | None = None) -> None:
    """Write `data` so that readers see the old file or the new one: locally a temporary sibling renamed over the
    path; on an object store one PUT, which is atomic per object."""
    if is_url(location):
        fs, path = fsspec.core.url_to_fs(str(location), **(storage_options or {}))
        fs.pipe_file(path, data)
        return
    path = Path(str(location).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(location: str | Path, data: Any, storage_options: dict | None = None) -> None:
    write_atomic(location, json.dumps(data, indent=1, default=_jsonable).encode(), storage_options)


def write_csv_atomic(table: pd.DataFrame, location: str | Path, float_format: str | None = None,
                     storage_options: dict | None = None) -> None:
    write_atomic(location, table.to_csv(index=False, float_format=float_format).encode(), storage_options)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class RunFolder:
    """A folder at a local path or an fsspec URL; paths inside it are '/'-separated keys relative to it."""

    def __init__(self, location: str | Path, storage_options: dict | None = None):
        self.storage_options = dict(storage_options or {})
        self.local = not is_url(location)
        self.url = absolute(location) if self.local else str(location).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def url_of(self, key: str = "") -> str:
        return f"{self.url}/{key}" if key else self.url

    def sub(self, key: str) -> RunFolder:
        return RunFolder(self.url_of(key), self.storage_options)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache()                      # another node may have written it since the last listing
        return self.fs.exists(self._path(key))

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """The file's bytes (those in [start, end) when given); FileNotFoundError where it is missing."""
        return self.fs.cat_file(self._path(key), start=start, end=end)

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def read_csv(self, key: str) -> pd.DataFrame:
        return pd.read_csv(io.BytesIO(self.read_bytes(key)))

    def write_bytes(self, key: str, data: bytes) -> None:
        write_atomic(self.url_of(key), data, self.storage_options)

    def write_json(self, key: str, data: Any) -> None:
        write_json_atomic(self.url_of(key), data, self.storage_options)

    def write_csv(self, key: str, table: pd.DataFrame, float_format: str | None = None) -> None:
        write_csv_atomic(table, self.url_of(key), float_format, self.storage_options)

    def glob(self, pattern: str) -> list[str]:
        """Keys matching `pattern` (fsspec glob), sorted."""
        self.fs.invalidate_cache()
        return sorted(p[len(self.root) + 1:] for p in self.fs.glob(self._path(pattern)))

    def remove(self, key: str) -> None:
        """Delete a file or folder (recursively); nothing happens where it does not exist."""
        if self.exists(key):
            self.fs.rm(self._path(key), recursive=True)

    def work_dir(self, key: str) -> Path:
        """Where a process writes the files of `key` before `upload`: the folder itself when local, else a folder in
        this node's cache directory ($MTSER_CACHE_DIR/runs/...)."""
        if self.local:
            return Path(self._path(key))
        from mtser.featurestore.cache import cache_dir

        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        return cache_dir() / "runs" / digest / key

    def upload(self, local: Path, key: str) -> None:
        """Copy a local file, or a folder's files, to `key` (each file atomically); a no-op where `local` already is
        that path (a local run folder's work dir)."""
        if self.local and Path(local).resolve() == Path(self._path(key)):
            return
        files = sorted(p for p in Path(local).rglob("*") if p.is_file()) if Path(local).is_dir() else [Path(local)]
        for file in files:
            rel = file.relative_to(local).as_posix() if Path(local).is_dir() else ""
            self.write_bytes(f"{key}/{rel}" if rel else key, file.read_bytes())

    def discard_work_dir(self, key: str) -> None:
        """Remove the node-local work folder of `key` once uploaded (a local run folder keeps its files)."""
        if not self.local:
            shutil.rmtree(self.work_dir(key), ignore_errors=True)

    def ray_storage(self, key: str) -> dict[str, Any]:
        """Ray Tune's RunConfig arguments that put its experiment folders at `key`: a local path, or the URL's path
        with the filesystem wrapped for pyarrow (any fsspec filesystem, with these storage options)."""
        if self.local:
            return {"storage_path": self._path(key)}
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return {"storage_path": self._path(key), "storage_filesystem": PyFileSystem(FSSpecHandler(self.fs))}


def as_run(run: RunFolder | str | Path, storage_options: dict | None = None) -> RunFolder:
    return run if isinstance(run, RunFolder) else RunFolder(run, storage_options)


def trial_key(stage: int, name: str) -> str:
    return f"stage{stage}/{name}"


def read_history(run_dir: RunFolder | str | Path, stage: int, name: str) -> pd.DataFrame | None:
    """A grid point's history.csv (one row per epoch: training loss, selection-split metrics); None before its first
    epoch ended."""
    try:
        return as_run(run_dir).read_csv(f"{trial_key(stage, name)}/history.csv")
    except FileNotFoundError:
        return None


def read_state(run_dir: RunFolder | str | Path, stage: int, name: str) -> dict[str, Any]:
    try:
        return as_run(run_dir).read_json(f"{trial_key(stage, name)}/state.json")
    except (OSError, ValueError):
        return {"status": "pending"}


def mark_state(run_dir: RunFolder | str | Path, stage: int, name: str, **changes: Any) -> None:
    """Update a grid point's state.json (created when missing)."""
    run = as_run(run_dir)
    key = f"{trial_key(stage, name)}/state.json"
    try:
        state = run.read_json(key)
    except (OSError, ValueError):
        state = {}
    state.update(changes)
    run.write_json(key, state)


def is_finished(run_dir: RunFolder | str | Path, stage: int, name: str) -> bool:
    return read_state(run_dir, stage, name).get("status") in FINISHED


def results_table(run_dir: RunFolder | str | Path, points: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per grid point (`points`: stage, name, alpha, beta, pooling, sigma, task, parent, optional axes) from
    its state; `axes` as the point's name shows them (`lw=on_layers=all`; empty without grid axes), `layer_entropy`
    from its best checkpoint's layer weights (`report_layers`; NaN without them)."""
    from mtser.trainer.report_layers import checkpoint_layer_entropy

    options = as_run(run_dir).storage_options
    rows = []
    for p in points:
        state = read_state(run_dir, p["stage"], p["name"])
        metrics = state.get("best_metrics") or {}
        tested = state.get("test_metrics") or {}
        rows.append({"stage": p["stage"], "trial": p["name"], "cohort": state.get("cohort"), "alpha": p["alpha"],
                     "beta": p["beta"], "pooling": p["pooling"], "axes": axis_tag(p.get("axes") or {}).lstrip("_"),
                     "sigma": p["sigma"], "task": p["task"],
                     "parent": p["parent"], "status": state.get("status", "pending"),
                     "best_epoch": state.get("best_epoch"), **{m: metrics.get(m, math.nan) for m in METRIC_COLUMNS},
                     **{f"test_{m}": tested.get(m, math.nan) for m in METRIC_COLUMNS},
                     "layer_entropy": checkpoint_layer_entropy(state.get("checkpoint"), options),
                     "checkpoint": state.get("checkpoint")})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def architecture(results: pd.DataFrame) -> pd.Series:
    """Each row's pooling with its grid axes (`asp`, `asp_lw=on_layers=all`): the stage-1 points one α × β grid
    holds."""
    axes = results["axes"].fillna("").astype(str) if "axes" in results else ""
    return (results["pooling"] + "_" + axes).str.rstrip("_")


def load_results(run_dir: RunFolder | str | Path) -> pd.DataFrame:
    try:
        return as_run(run_dir).read_csv(RESULTS)
    except FileNotFoundError:
        raise RunError(f"{run_dir}: no {RESULTS} (run `mtser tune ... --out {run_dir}` first)") from None


def load_search_record(run_dir: RunFolder | str | Path) -> dict[str, Any]:
    try:
        return as_run(run_dir).read_json("search.json")
    except FileNotFoundError:
        raise RunError(f"{run_dir}: no search.json (not a run folder of `mtser tune`)") from None
