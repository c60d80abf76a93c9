"""Ray Tune search: stage 1 (α × β × pooling, multi-task) then stage 2 (task fine-tuning from the best stage-1 trials).

Layout of a run directory::

    RUN/search.json              the search, the resolved base config and the store it ran on
    RUN/stage1/<trial>/          the trainer's output (best/, history.csv) and state.json (this module's bookkeeping)
    RUN/stage2/<trial>/          likewise
    RUN/ray/stage<k>-<n>/        Ray Tune's own experiment folders (TensorBoard event files, progress.csv)
    RUN/results.csv              one row per trial (RESULT_COLUMNS)

`state.json` is written atomically after every epoch; a trial counts as finished once its status is `complete`
(training returned) or `stopped` (ASHA stopped it). `--resume` re-runs only unfinished trials, from scratch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mtser.config import Config, SearchConfig, TrialResources, from_dict, load_config, load_yaml_as, to_dict

METRIC_COLUMNS = ["f1", "ccc_arousal", "ccc_valence", "ccc_dominance", "ccc_mean"]
RESULT_COLUMNS = ["stage", "trial", "alpha", "beta", "pooling", "sigma", "task", "parent", "status", "best_epoch",
                  *METRIC_COLUMNS, "checkpoint"]
FINISHED = ("complete", "stopped")
OBJECTIVE = "objective"        # reported each epoch: the trial's own selection metric (f1, ccc_mean or score)


class SearchError(RuntimeError):
    """The search cannot start or continue (the message says why); `usage` marks a wrong invocation (exit 2)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


@dataclass
class TrialSpec:
    """One trial of either stage; `config` is the full recipe (to_dict form) the trainer receives."""

    stage: int
    name: str
    alpha: float
    beta: float
    pooling: str
    task: str
    config: dict[str, Any]
    sigma: float | None = None
    parent: str | None = None
    init_from: str | None = None


@dataclass
class SearchSummary:
    table: pd.DataFrame
    failed: list[str] = field(default_factory=list)      # trial names that raised
    ran: list[str] = field(default_factory=list)         # trial names run by this call (not skipped as finished)


# ------------------------------------------------------------------------------------------------------------ trial specs
def trial_config(base: Path, search: SearchConfig, overrides: dict[str, Any], device: str) -> dict[str, Any]:
    merged = {**search.overrides, **overrides, "train.device": device, "finetune.device": device}
    return to_dict(load_config(base, merged))


def stage1_specs(search: SearchConfig, base: Path, device: str) -> list[TrialSpec]:
    specs = []
    for pooling in search.pooling:
        for alpha in search.alpha:
            for beta in search.beta:
                if alpha + beta == 0:
                    continue
                cfg = trial_config(base, search, {"loss.alpha": alpha, "loss.beta": beta, "model.pooling": pooling,
                                                  "train.task": "multi"}, device)
                specs.append(TrialSpec(1, f"a{alpha:g}_b{beta:g}_{pooling}", alpha, beta, pooling, "multi", cfg))
    return specs


def stage2_specs(search: SearchConfig, base: Path, device: str, stage1: pd.DataFrame) -> list[TrialSpec]:
    """Classification from the `cat_parents` best by dev F1; attributes from the `dim_parents` best by mean CCC × σ."""
    done = stage1[stage1["status"].isin(FINISHED) & stage1["checkpoint"].notna()]
    specs = []
    for task, metric, count in (("cat", "f1", search.cat_parents), ("dim", "ccc_mean", search.dim_parents)):
        parents = done.sort_values([metric, "trial"], ascending=[False, True]).head(count)
        for _, parent in parents.iterrows():
            for sigma in (search.sigma if task == "dim" else [None]):
                tag = "cat" if task == "cat" else f"dim_{'mse' if sigma is None else f's{sigma:g}'}"
                overrides = {"loss.alpha": parent["alpha"], "loss.beta": parent["beta"],
                             "model.pooling": parent["pooling"], "loss.sigma": sigma, "finetune.task": task,
                             "finetune.select_metric": metric}
                specs.append(TrialSpec(2, f"{tag}__{parent['trial']}", float(parent["alpha"]), float(parent["beta"]),
                                       str(parent["pooling"]), task, trial_config(base, search, overrides, device),
                                       sigma=sigma, parent=str(parent["trial"]), init_from=str(parent["checkpoint"])))
    return specs


# ----------------------------------------------------------------------------------------------------------- bookkeeping
def trial_dir(run_dir: Path, spec: TrialSpec | dict) -> Path:
    stage, name = (spec.stage, spec.name) if isinstance(spec, TrialSpec) else (spec["stage"], spec["name"])
    return Path(run_dir) / f"stage{stage}" / name


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_state(run_dir: Path, spec: TrialSpec | dict) -> dict[str, Any]:
    path = trial_dir(run_dir, spec) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "pending"}


def mark_state(path_dir: Path, **changes: Any) -> None:
    path_dir.mkdir(parents=True, exist_ok=True)
    state_path = path_dir / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {}
    state.update(changes)
    write_json_atomic(state_path, state)


def is_finished(run_dir: Path, spec: TrialSpec) -> bool:
    return read_state(run_dir, spec).get("status") in FINISHED


def results_table(run_dir: Path, specs: list[TrialSpec]) -> pd.DataFrame:
    rows = []
    for spec in specs:
        state = read_state(run_dir, spec)
        metrics = state.get("best_metrics") or {}
        rows.append({"stage": spec.stage, "trial": spec.name, "alpha": spec.alpha, "beta": spec.beta,
                     "pooling": spec.pooling, "sigma": spec.sigma, "task": spec.task, "parent": spec.parent,
                     "status": state.get("status", "pending"), "best_epoch": state.get("best_epoch"),
                     **{m: metrics.get(m, math.nan) for m in METRIC_COLUMNS},
                     "checkpoint": state.get("checkpoint")})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


# -------------------------------------------------------------------------------------------------------------- trainable
def run_trial(config: dict[str, Any], run_dir: str, store_url: str, threads: int) -> None:
    """The Ray Tune function trainable: train one spec, report each epoch, keep the best checkpoint in RUN."""
    import torch
    from ray import tune

    from mtser.trainer.loop import train

    torch.set_num_threads(threads)
    spec = config["spec"]
    out = trial_dir(Path(run_dir), spec)
    shutil.rmtree(out, ignore_errors=True)          # an unfinished earlier attempt restarts from scratch
    out.mkdir(parents=True)
    mark_state(out, status="running", best_epoch=None, best_metrics=None, checkpoint=None)
    cfg = from_dict(Config, spec["config"])
    metric = spec["config"]["train" if spec["stage"] == 1 else "finetune"]["select_metric"]

    def on_epoch(epoch: int, metrics: dict[str, float], best_dir: Path | None) -> None:
        checkpoint = None
        if best_dir is not None:
            mark_state(out, best_epoch=epoch, best_metrics=dict(metrics), checkpoint=str(best_dir))
            checkpoint = tune.Checkpoint.from_directory(str(best_dir))
        tune.report({**metrics, "epoch": epoch, OBJECTIVE: metrics[metric]}, checkpoint=checkpoint)

    stage = "pretrain" if spec["stage"] == 1 else "finetune"
    init_from = Path(spec["init_from"]) if spec.get("init_from") else None
    result = train(cfg, store_url, out, stage=stage, init_from=init_from, on_epoch=on_epoch)
    mark_state(out, status="complete", best_epoch=result.best_epoch, best_metrics=dict(result.best_metrics),
               checkpoint=str(result.best_checkpoint), epochs_run=len(result.history))


# ---------------------------------------------------------------------------------------------------------------- driver
def available_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def trial_resources(wanted: TrialResources, cluster_gpus: float) -> dict[str, float]:
    """Per-trial Ray resources; the GPU share is dropped where the cluster has no GPU (Ray would wait forever)."""
    return {"cpu": wanted.cpu, "gpu": wanted.gpu if cluster_gpus > 0 else 0.0}


def run_stage(stage: int, specs: list[TrialSpec], search: SearchConfig, run_dir: Path, store_url: str,
              verbose: int = 1) -> tuple[list[str], list[str]]:
    """Run the unfinished `specs` as one Ray Tune experiment; returns (names run, names failed)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    pending = [s for s in specs if not is_finished(run_dir, s)]
    if not pending:
        return [], []
    resources = trial_resources(search.resources, available_gpus())
    threads = max(1, int(round(resources["cpu"])))
    trainable = tune.with_resources(tune.with_parameters(run_trial, run_dir=str(run_dir), store_url=store_url,
                                                         threads=threads), resources)
    scheduler = None
    if search.asha is not None:
        epochs = max(s.config["train" if stage == 1 else "finetune"]["epochs"] for s in pending)

        class RecordingASHA(ASHAScheduler):
            """ASHA that marks the trials it stops as finished (`stopped`), so --resume leaves them alone."""

            def on_trial_result(self, tune_controller, trial, result):  # noqa: ANN001
                decision = super().on_trial_result(tune_controller, trial, result)
                if decision == TrialScheduler.STOP:
                    mark_state(trial_dir(run_dir, trial.config["spec"]), status="stopped")
                return decision

        scheduler = RecordingASHA(time_attr="training_iteration", metric=OBJECTIVE, mode="max", max_t=epochs,
                                  grace_period=search.asha.grace_period, reduction_factor=search.asha.reduction_factor)
    ray_dir = run_dir / "ray"
    attempt = len(list(ray_dir.glob(f"stage{stage}-*"))) if ray_dir.exists() else 0
    tuner = tune.Tuner(
        trainable,
        param_space={"spec": tune.grid_search([dataclasses.asdict(s) for s in pending])},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=search.max_concurrent or None,
                                    reuse_actors=True,      # later trials skip process start and imports
                                    trial_name_creator=lambda t: t.config["spec"]["name"],
                                    trial_dirname_creator=lambda t: t.config["spec"]["name"]),
        run_config=tune.RunConfig(name=f"stage{stage}-{attempt}", storage_path=str(ray_dir.resolve()),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1,
                                                                          checkpoint_score_attribute=OBJECTIVE),
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                  verbose=verbose),
    )
    grid = tuner.fit()
    failed = []
    for result in grid:
        spec = (result.config or {}).get("spec")    # trials an interruption left unstarted have no config
        if spec is not None and result.error is not None:
            failed.append(spec["name"])
            mark_state(trial_dir(run_dir, spec), status="failed", error=str(result.error).strip().splitlines()[-1][:500])
    unfinished = [s.name for s in pending if not is_finished(run_dir, s) and s.name not in failed]
    if unfinished:
        raise SearchError(f"stage {stage} interrupted; unfinished trials {unfinished} (finish with --resume)")
    return [s.name for s in pending], failed


def prepare_run(search_file: Path, store_url: str, run_dir: Path, resume: bool) -> tuple[SearchConfig, Path]:
    """Validate the search, record it in RUN/search.json; on --resume insist that it is the same search and store."""
    search = load_yaml_as(search_file, SearchConfig)
    base = (search_file.parent / search.base).resolve()
    load_config(base, search.overrides)             # fail now, naming the key, rather than in every trial
    record = {"search": to_dict(search), "search_file": str(search_file.resolve()), "base": str(base),
              "store": store_url}
    meta = run_dir / "search.json"
    if meta.exists():
        if not resume:
            raise SearchError(f"{run_dir}: already holds a search; pass --resume to finish it or choose another --out",
                              usage=True)
        previous = json.loads(meta.read_text())
        for key in ("search", "store"):
            if previous[key] != record[key]:
                raise SearchError(f"{run_dir}: --resume with a different {key} than the run was started with "
                                  f"({previous[key]!r})", usage=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta, record)
    return search, base


def run_search(search_file: str | Path, store_url: str, run_dir: str | Path, *, resume: bool = False,
               stages: tuple[int, ...] = (1, 2), verbose: int = 1,
               storage_options: dict | None = None) -> SearchSummary:
    """Both stages of the search; writes RUN/results.csv and returns the table (finished and failed trials).

    A remote store (s3://...) is mirrored once to RUN/store, and the trials read the mirror: one download instead of
    one per trial, and concurrent trials share the mirror's pages in the OS cache."""
    import ray

    from mtser.featurestore.store import StoreError, open_store

    run_dir = Path(run_dir).resolve()
    if "://" not in store_url:              # trials run in Ray workers with another working directory
        store_url = str(Path(store_url).resolve())
    try:
        open_store(store_url, storage_options=storage_options)
    except StoreError as exc:
        raise SearchError(f"cannot open the store: {exc}", usage=True) from None
    search, base = prepare_run(Path(search_file), store_url, run_dir, resume)
    trial_store = mirror_store(store_url, run_dir / "store", storage_options) if "://" in store_url else store_url
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=verbose > 1)
    device = "cuda" if trial_resources(search.resources, available_gpus())["gpu"] > 0 else "cpu"
    ran: list[str] = []
    failed: list[str] = []
    specs = stage1_specs(search, base, device)
    if 1 in stages:
        r, f = run_stage(1, specs, search, run_dir, trial_store, verbose)
        ran += r
        failed += f
    if 2 in stages:
        stage2 = stage2_specs(search, base, device, results_table(run_dir, specs))
        r, f = run_stage(2, stage2, search, run_dir, trial_store, verbose)
        ran += r
        failed += f
        specs += stage2
    table = results_table(run_dir, specs)
    write_table(table, run_dir / "results.csv")
    return SearchSummary(table, failed, ran)


def mirror_store(url: str, dest: Path, storage_options: dict | None = None) -> str:
    """Copy a remote store's files to `dest` (each through a temporary name); files already there with the same size
    are kept, so an interrupted copy resumes. Mirror a store nobody is writing to. Returns the local path."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    for path, info in sorted(fs.find(root, detail=True).items()):
        target = dest / path[len(root) + 1:]
        if target.is_file() and target.stat().st_size == info["size"]:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        fs.get_file(path, str(partial))
        os.replace(partial, target)
    return str(dest)


def write_table(table: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)


def load_results(run_dir: str | Path) -> pd.DataFrame:
    path = Path(run_dir) / "results.csv"
    if not path.exists():
        raise SearchError(f"{run_dir}: no results.csv (run `mtser tune ... --out {run_dir}` first)")
    return pd.read_csv(path)
