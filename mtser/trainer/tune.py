"""Ray Tune search: stage 1 (α × β × pooling, multi-task) then stage 2 (task fine-tuning from the best stage-1 models).

Grid points that share an architecture and a schedule are trained together as one cohort (`loop.train_cohort`):
stage 1 groups the α × β points of one pooling, stage 2 the variants of one parent and task. A cohort holds at most
`cohort_size` members (default: as many as `cohort_memory_gb` holds, by `cohort.member_bytes`) and is one Ray Tune
trial with the search's per-trial `resources`, so cohorts spread over GPUs and nodes. Each grid point keeps its own
folder, checkpoint, history and state in the run folder (`runs.py`); `--resume` regroups the unfinished grid points
into cohorts and trains only those. `cohort_size: 1` trains one grid point per trial.

This module is the Ray driver; the grid points and cohorts are planned in `grid.py` (typed `Config`s, turned into
plain data only for Ray Tune's trial parameters) and sized in `search_plan.py`.

The run folder may be a URL (s3://bucket/run): trials write state, history and checkpoints there and Ray Tune keeps
its experiment folders there, so no node needs a disk another node sees. A remote store is copied once per node into
that node's cache (`featurestore.cache`) by the first trial that needs it; the others on the node read the copy.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from mtser.configio import ConfigError, from_dict, load_yaml_as, to_dict
from mtser.errors import DATA, MtserError, USAGE
from mtser.featurestore.files import absolute
from mtser.trainer.config import Config, load_config
from mtser.trainer.grid import CohortSpec, TrialSpec, stage1_specs, stage2_specs
from mtser.trainer.runs import (
    FINISHED, RESULTS, RunFolder, as_run, is_finished, mark_state, read_state, results_table, trial_key,
)
from mtser.trainer.search_config import AshaConfig, SearchConfig, TrialResources
from mtser.trainer.search_plan import SearchPlan, plan_cohorts, plan_search

OBJECTIVE = "objective"        # reported each epoch: the best member's own selection metric (f1, ccc_mean or score)


class SearchError(MtserError, RuntimeError):
    """The search cannot start or continue (the message says why); `usage` marks a wrong invocation (exit code 2)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message, USAGE if usage else DATA)


@dataclass
class SearchSummary:
    table: pd.DataFrame
    failed: list[str] = field(default_factory=list)      # grid points that failed (trial error or divergence)
    ran: list[str] = field(default_factory=list)         # grid points run by this call (not skipped as finished)
    cohorts: list[str] = field(default_factory=list)     # cohorts (Ray Tune trials) run by this call
    events: list[str] = field(default_factory=list)      # cohorts whose trial failed or whose process died


# -------------------------------------------------------------------------------------------------------------- trainable
def run_cohort(config: dict[str, Any], run_dir: str, store_url: str, threads: int, halving: AshaConfig | None,
               storage_options: dict | None = None) -> None:
    """The Ray Tune function trainable: train one cohort (`config["cohort"]`, a CohortSpec as plain data); each grid
    point's state follows every epoch.

    Members train in their work folders (`RunFolder.work_dir`) and each epoch's history and new best checkpoint are
    uploaded before state.json names them; a remote store is read from this node's cached copy."""
    import torch
    from ray import tune

    from mtser.featurestore.cache import cached_store
    from mtser.trainer.checkpoint import SIDECAR
    from mtser.trainer.loop import Member, MemberEpoch, train_cohort

    torch.set_num_threads(threads)
    run = RunFolder(run_dir, storage_options)
    cohort = from_dict(CohortSpec, config["cohort"], "cohort")
    specs = {spec.name: spec for spec in cohort.members}
    keys = {spec.name: trial_key(spec.stage, spec.name) for spec in cohort.members}
    members = []
    for spec in cohort.members:
        run.remove(keys[spec.name])                      # an unfinished earlier attempt restarts from scratch
        run.discard_work_dir(keys[spec.name])
        mark_state(run, spec.stage, spec.name, status="running", cohort=cohort.name, best_epoch=None,
                   best_metrics=None, checkpoint=None, node=platform.node(), pid=os.getpid())
        members.append(Member(spec.name, spec.config, run.work_dir(keys[spec.name]),
                              "pretrain" if spec.stage == 1 else "finetune", spec.init_from or None,
                              None if spec.stage == 1 else spec.task, storage_options=storage_options))

    def on_epoch(epoch: int, reports: list[MemberEpoch]) -> None:
        objectives = {}
        for r in reports:
            key = keys[r.name]
            changes: dict[str, Any] = {"status": r.status}
            if r.row is not None:
                changes["epochs_run"] = epoch
                objectives[f"{r.name}/{OBJECTIVE}"] = r.row[specs[r.name].schedule.select_metric]
                run.upload(run.work_dir(key) / "history.csv", f"{key}/history.csv")
            if r.best_dir is not None:
                run.upload(r.best_dir, f"{key}/best")
                changes.update(best_epoch=epoch, best_metrics=dict(r.row), checkpoint=run.url_of(f"{key}/best"))
            if r.error is not None:
                changes["error"] = r.error
            mark_state(run, specs[r.name].stage, r.name, **changes)
        finite = [v for v in objectives.values() if math.isfinite(v)]
        tune.report({"epoch": epoch, "members": len(objectives), OBJECTIVE: max(finite, default=math.nan),
                     **objectives})

    results = train_cohort(members, cached_store(store_url, storage_options), halving=halving, on_epoch=on_epoch,
                           store_url=store_url)
    for name, result in results.items():
        if result.test_metrics is not None:             # the trainer added them to best/ after the last epoch
            run.upload(result.best_checkpoint / SIDECAR, f"{keys[name]}/best/{SIDECAR}")
        mark_state(run, specs[name].stage, name, status=result.status, epochs_run=len(result.history),
                   error=result.error, test_metrics=result.test_metrics)
        run.discard_work_dir(keys[name])


# ---------------------------------------------------------------------------------------------------------------- driver
def available_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def trial_resources(wanted: TrialResources, cluster_gpus: float) -> dict[str, float]:
    """Per-trial Ray resources; the GPU share is dropped where the cluster has no GPU (Ray would wait forever)."""
    return {"cpu": wanted.cpu, "gpu": wanted.gpu if cluster_gpus > 0 else 0.0}


def run_stage(stage: int, specs: list[TrialSpec], search: SearchConfig, run_dir: RunFolder, store_url: str,
              verbose: int = 1, tell: Any = None) -> tuple[list[str], list[str], list[str]]:
    """Train the unfinished grid points of `specs` in cohorts, one Ray Tune experiment; returns (grid points run,
    grid points failed, cohorts run). `tell(line)` hears of each cohort whose trial failed (`cohort_failure`)."""
    from ray import tune

    from mtser.featurestore.store import open_store

    pending = [s for s in specs if not is_finished(run_dir, s.stage, s.name)]
    if not pending:
        return [], [], []
    cohorts = plan_cohorts(pending, search, lambda: open_store(store_url, storage_options=run_dir.storage_options))
    resources = trial_resources(search.resources, available_gpus())
    threads = max(1, int(round(resources["cpu"])))
    trainable = tune.with_resources(tune.with_parameters(run_cohort, run_dir=run_dir.url, store_url=store_url,
                                                         threads=threads, halving=search.asha,
                                                         storage_options=run_dir.storage_options), resources)
    attempt = len(run_dir.glob(f"ray/stage{stage}-*"))
    tuner = tune.Tuner(
        trainable,
        param_space={"cohort": tune.grid_search([to_dict(c) for c in cohorts])},     # Ray Tune's parameters: data
        tune_config=tune.TuneConfig(max_concurrent_trials=search.max_concurrent or None,
                                    reuse_actors=True,      # later cohorts skip process start and imports
                                    trial_name_creator=lambda t: t.config["cohort"]["name"],
                                    trial_dirname_creator=lambda t: t.config["cohort"]["name"]),
        run_config=tune.RunConfig(name=f"stage{stage}-{attempt}", **run_dir.ray_storage("ray"),
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                  verbose=verbose),
    )
    by_name = {c.name: c for c in cohorts}
    for result in tuner.fit():
        params = (result.config or {}).get("cohort")    # cohorts an interruption left unstarted have no config
        if params is not None and result.error is not None:
            cohort = by_name[params["name"]]
            error = str(result.error).strip().splitlines()[-1][:500]
            if tell is not None:
                tell(cohort_failure(run_dir, cohort, result.error))
            for spec in cohort.members:
                if not is_finished(run_dir, spec.stage, spec.name):
                    mark_state(run_dir, spec.stage, spec.name, status="failed", cohort=cohort.name, error=error)
    states = {s.name: _status(run_dir, s) for s in pending}
    failed = [name for name, status in states.items() if status == "failed"]
    unfinished = [name for name, status in states.items() if status not in FINISHED and status != "failed"]
    if unfinished:
        raise SearchError(f"stage {stage} interrupted; unfinished grid points {unfinished} (finish with --resume)")
    return [s.name for s in pending], failed, [c.name for c in cohorts]


def cohort_failure(run_dir: RunFolder, cohort: CohortSpec, error: BaseException) -> str:
    """One line on a cohort whose Ray Tune trial ended in `error`: its grid points, the process (pid and host from
    the first member's state) and whether it died or raised, attempt 1 of 1 (a search retries no trial itself)."""
    from ray.exceptions import RayActorError

    first = cohort.members[0]
    state = read_state(run_dir, first.stage, first.name)
    where = f"pid {state['pid']} on {state.get('node')}" if state.get("pid") else "not started"
    text = str(error)
    died = isinstance(error, RayActorError) or "ActorDiedError" in text or "died" in text.lower()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = (lines[0] if died else lines[-1]) if lines else type(error).__name__
    names = ", ".join(m.name for m in cohort.members)
    what = "its trial process died" if died else "its trial raised"
    return (f"cohort {cohort.name} (stage {first.stage}, grid points {names}): {what} ({where}), attempt 1 of 1; "
            f"its unfinished grid points are marked failed; rerun with --resume to retrain them [Ray: {reason[:200]}]")


def _status(run_dir: RunFolder, spec: TrialSpec) -> str:
    return read_state(run_dir, spec.stage, spec.name).get("status", "pending")


def prepare_run(search_file: Path, store_url: str, run_dir: RunFolder | str | Path, resume: bool,
                check: Callable[[SearchConfig, Path], None] | None = None) -> tuple[SearchConfig, Path]:
    """Validate the search, call `check(search, base)` (which may refuse it), record it in RUN/search.json; on
    --resume insist that it is the same search and store."""
    search = load_yaml_as(search_file, SearchConfig)
    base = (search_file.parent / search.base).resolve()
    load_config(base, search.overrides)             # fail now, naming the key, rather than in every trial
    for name, changes in search.cat_variants.items():
        try:
            load_config(base, {**search.overrides, **changes})
        except ConfigError as exc:
            raise ConfigError(f"{search_file}: cat_variants.{name}: {exc}") from None
    record = {"search": to_dict(search), "search_file": str(search_file.resolve()), "base": str(base),
              "store": store_url}
    run_dir = as_run(run_dir)
    if run_dir.exists("search.json"):
        if not resume:
            raise SearchError(f"{run_dir}: already holds a search; pass --resume to finish it or choose another --out",
                              usage=True)
        previous = run_dir.read_json("search.json")
        for key in ("search", "store"):
            if previous[key] != record[key]:
                raise SearchError(f"{run_dir}: --resume with a different {key} than the run was started with "
                                  f"({previous[key]!r})", usage=True)
    if check is not None:
        check(search, base)
    run_dir.write_json("search.json", record)
    return search, base


def run_search(search_file: str | Path, store_url: str, run_dir: str | Path, *, resume: bool = False,
               stages: tuple[int, ...] = (1, 2), verbose: int = 1, storage_options: dict | None = None,
               approve: Callable[[SearchPlan], bool] | None = None, notify: Any = None) -> SearchSummary:
    """Both stages of the search; writes RUN/results.csv and returns the table (finished and failed grid points).

    `run_dir` is a local path or a URL; `storage_options` apply to it and to the store. A remote store (s3://...) is
    copied once per node into the node's cache, and the cohorts there read that copy. With `approve`, a plan that
    has `problems()` (too many points, too much memory or time) runs only if `approve(plan)` says so; otherwise
    SearchError (usage) before anything is written. `notify(line)` hears of each cohort whose trial failed or whose
    process died as the stage ends; the lines are kept in `summary.events`."""
    import ray

    from mtser.featurestore.store import StoreError, open_store

    run_dir = RunFolder(run_dir, storage_options)
    store_url = absolute(store_url)          # trials run in Ray workers with another working directory
    try:
        store = open_store(store_url, storage_options=storage_options)
    except StoreError as exc:
        raise SearchError(f"cannot open the store: {exc}", usage=True) from None

    def check(search: SearchConfig, base: Path) -> None:
        if approve is None:
            return
        plan = plan_search(search, base, store, run_dir, max(1, int(round(search.resources.cpu))))
        if plan.problems() and not approve(plan):
            raise SearchError(f"the search plan needs approval ({'; '.join(plan.problems())}); pass --yes to run it",
                              usage=True)

    search, base = prepare_run(Path(search_file), store_url, run_dir, resume, check)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=verbose > 1)
    device = "cuda" if trial_resources(search.resources, available_gpus())["gpu"] > 0 else "cpu"
    summary = SearchSummary(pd.DataFrame())
    specs = stage1_specs(search, base, device)

    def tell(line: str) -> None:
        summary.events.append(line)
        if notify is not None:
            notify(line)

    def run(stage: int, stage_specs: list[TrialSpec]) -> None:
        ran, failed, cohorts = run_stage(stage, stage_specs, search, run_dir, store_url, verbose, tell)
        summary.ran += ran
        summary.failed += failed
        summary.cohorts += cohorts

    if 1 in stages and 1 in search.stages:
        run(1, specs)
    if 2 in stages and 2 in search.stages:
        stage2 = stage2_specs(search, base, device, results_table(run_dir, _points(specs)))
        run(2, stage2)
        specs += stage2
    summary.table = results_table(run_dir, _points(specs))
    run_dir.write_csv(RESULTS, summary.table)
    return summary


def _points(specs: list[TrialSpec]) -> list[dict[str, Any]]:
    return [{f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name != "config"} for s in specs]
