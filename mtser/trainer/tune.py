"""Ray Tune search: stage 1 (α × β × pooling, multi-task) then stage 2 (task fine-tuning from the best stage-1 models).

Grid points that share an architecture and a schedule are trained together as one cohort (`loop.train_cohort`):
stage 1 groups the α × β points of one pooling, stage 2 the variants of one parent and task. A cohort holds at most
`cohort_size` members (default: as many as `cohort_memory_gb` holds, by `cohort.member_bytes`) and is one Ray Tune
trial with the search's per-trial `resources`, so cohorts spread over GPUs and nodes. Each grid point keeps its own
folder, checkpoint, history and state in the run folder (`runs.py`); `--resume` regroups the unfinished grid points
into cohorts and trains only those. `cohort_size: 1` trains one grid point per trial.

The run folder may be a URL (s3://bucket/run): trials write state, history and checkpoints there and Ray Tune keeps
its experiment folders there, so no node needs a disk another node sees. A remote store is copied once per node into
that node's cache (`featurestore.cache`) by the first trial that needs it; the others on the node read the copy.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from mtser.config import (
    Config, ConfigError, GridPoint, SearchConfig, TrialResources, from_dict, load_config, load_yaml_as, to_dict,
)
from mtser.errors import DATA, USAGE, MtserError
from mtser.featurestore.files import absolute
from mtser.trainer.runs import (
    FINISHED, RESULTS, RunFolder, as_run, is_finished, mark_state, read_state, results_table, trial_key,
)

OBJECTIVE = "objective"        # reported each epoch: the best member's own selection metric (f1, ccc_mean or score)


class SearchError(MtserError, RuntimeError):
    """The search cannot start or continue (the message says why); `usage` marks a wrong invocation (exit code 2)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message, USAGE if usage else DATA)


@dataclass
class TrialSpec:
    """One grid point of either stage; `config` is the full recipe (to_dict form) the trainer receives."""

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

    @property
    def schedule(self) -> dict[str, Any]:
        return self.config["train"] if self.stage == 1 else self.config["finetune"][self.task]


@dataclass
class CohortSpec:
    """Grid points trained together as one fused model in one Ray Tune trial."""

    stage: int
    name: str
    members: list[TrialSpec]


@dataclass
class SearchSummary:
    table: pd.DataFrame
    failed: list[str] = field(default_factory=list)      # grid points that failed (trial error or divergence)
    ran: list[str] = field(default_factory=list)         # grid points run by this call (not skipped as finished)
    cohorts: list[str] = field(default_factory=list)     # cohorts (Ray Tune trials) run by this call
    events: list[str] = field(default_factory=list)      # cohorts whose trial failed or whose process died


# ------------------------------------------------------------------------------------------------------------ trial specs
def trial_config(base: Path, search: SearchConfig, overrides: dict[str, Any], device: str) -> dict[str, Any]:
    devices = {f"{section}.device": device for section in ("train", "finetune.cat", "finetune.dim")}
    return to_dict(load_config(base, {**search.overrides, **overrides, **devices}))


def stage1_specs(search: SearchConfig, base: Path, device: str) -> list[TrialSpec]:
    specs = []
    for p in search.stage1_points():
        cfg = trial_config(base, search, {"loss.alpha": p.alpha, "loss.beta": p.beta, "model.pooling": p.pooling,
                                          "train.task": "multi"}, device)
        specs.append(TrialSpec(1, point_name(p.alpha, p.beta, p.pooling), p.alpha, p.beta, p.pooling, "multi", cfg))
    return specs


def point_name(alpha: float, beta: float, pooling: str) -> str:
    return f"a{alpha:g}_b{beta:g}_{pooling}"


def stage2_parents(search: SearchConfig, stage1: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The stage-1 points each task fine-tunes: `cat_parents` best by selection macro-F1; `dim_parents` best by
    mean CCC (overall, or a count per pooling: the paper's best ASP and best mean-pooling models). Only finished
    points that their `parent_for` allows."""
    done = stage1[stage1["status"].isin(FINISHED) & stage1["checkpoint"].notna()]
    allowed = {point_name(p.alpha, p.beta, p.pooling): p.parent_for for p in search.stage1_points()}

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
    """Per cat parent, one grid point per `cat_variants` entry; per dim parent, one per σ."""
    specs = []
    for task, parents in stage2_parents(search, stage1).items():
        for _, parent in parents.iterrows():
            inherited = {"loss.alpha": parent["alpha"], "loss.beta": parent["beta"], "model.pooling": parent["pooling"]}
            if task == "cat":
                variants = [(f"cat-{name}", None, {**inherited, "loss.sigma": None, **changes})
                            for name, changes in search.cat_variants.items()]
            else:
                variants = [(f"dim_{'mse' if sigma is None else f's{sigma:g}'}", sigma, {**inherited, "loss.sigma": sigma})
                            for sigma in search.sigma]
            for tag, sigma, overrides in variants:
                specs.append(TrialSpec(2, f"{tag}__{parent['trial']}", float(parent["alpha"]), float(parent["beta"]),
                                       str(parent["pooling"]), task, trial_config(base, search, overrides, device),
                                       sigma=sigma, parent=str(parent["trial"]), init_from=str(parent["checkpoint"])))
    return specs


# ---------------------------------------------------------------------------------------------------------------- cohorts
def cohort_key(spec: TrialSpec) -> str:
    """Grid points with equal keys can share a cohort: one architecture, one batch stream, one parent, one task."""
    from mtser.trainer.loop import SHARED_FIELDS

    return json.dumps({"model": spec.config["model"], "schedule": {f: spec.schedule[f] for f in SHARED_FIELDS},
                       "stage": spec.stage, "task": spec.task, "init_from": spec.init_from}, sort_keys=True)


@dataclass
class MemberCost:
    """What one member of `spec`'s architecture costs to train: memory (cohort.member_bytes) and rough FLOPs per
    training sample (cohort.member_flops)."""

    bytes: int
    flops: float


def member_cost(spec: TrialSpec, store) -> MemberCost:
    from mtser.trainer.cohort import member_bytes, member_flops
    from mtser.trainer.data import training_ids

    cfg = from_dict(Config, spec.config)
    encoders = list(cfg.model.encoders) if cfg.model.encoders else sorted(store.encoders)
    ids = training_ids(store, encoders, spec.task)
    frames = {n: int(np.percentile([store.length(i, n) for i in ids], 95)) if ids else 1 for n in encoders}
    dims = {n: store.encoders[n].dim for n in encoders}
    return MemberCost(member_bytes(dims, cfg.model, spec.schedule["batch_size"], frames),
                      member_flops(dims, cfg.model, frames))


def auto_cohort_size(spec: TrialSpec, store, memory_gb: float) -> int:
    """Members of `spec`'s architecture that fit `memory_gb` by `cohort.member_bytes` (at least 1)."""
    return _members_fitting(memory_gb, member_cost(spec, store).bytes)


def _members_fitting(memory_gb: float, member_bytes: int) -> int:
    return max(1, int(memory_gb * 2**30 // member_bytes))


def available_memory() -> int:
    """Bytes of memory this machine can give now: /proc/meminfo's MemAvailable, capped by the cgroup's limit less
    its usage where one is set (cgroup v2, else v1); the physical memory where /proc is missing."""
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        candidates.append(int(fields["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        candidates.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    v1 = "/sys/fs/cgroup/memory/memory"
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (f"{v1}.limit_in_bytes", f"{v1}.usage_in_bytes")):
        try:
            with open(limit) as f, open(usage) as g:
                candidates.append(int(f.read().strip()) - int(g.read().strip()))   # "max": no limit (ValueError)
            break
        except (OSError, ValueError):
            continue
    return max(0, min(candidates))


def concurrent_trials(search: SearchConfig) -> int:
    """Cohorts that train at once on one machine: this machine's CPUs over the per-trial CPUs, at most
    `max_concurrent` when set."""
    by_cpu = max(1, int((os.cpu_count() or 1) // max(search.resources.cpu, 1e-6)))
    return min(search.max_concurrent, by_cpu) if search.max_concurrent else by_cpu


MEMORY_SHARE = 0.75          # of the available memory, what cohorts may plan for (the rest: batches, Ray, Python)


def trial_memory_gb(search: SearchConfig) -> float:
    """The memory one cohort may plan for: `cohort_memory_gb`, capped by MEMORY_SHARE of the memory available now
    shared among the cohorts that train at once."""
    return min(search.cohort_memory_gb, MEMORY_SHARE * available_memory() / concurrent_trials(search) / 2**30)


MAX_PLAN_POINTS = 200       # a larger search runs only when approved (`mtser tune --yes`)
MAX_PLAN_HOURS = 24.0       # likewise a search estimated to take longer
NOMINAL_FLOPS = 2e10        # float32 FLOP/s of one trial CPU the time estimate assumes (rough; fusion runs faster)


@dataclass
class SearchPlan:
    """What a search is about to run (stage 1 exactly, stage 2 at most), shown before a large one starts."""

    points: int                 # stage-1 grid points to train
    stage2_points: int          # stage-2 grid points at most (fine-tunings of the best stage-1 points)
    cohorts: int                # stage-1 cohorts (Ray Tune trials)
    largest_cohort: int         # members of the largest
    cohort_bytes: int           # its estimated training memory
    concurrent: int             # cohorts that train at once on this machine
    available_bytes: int        # memory available on this machine now
    hours: float                # rough training time of stage 1 and at most stage 2, cohorts in parallel

    def problems(self) -> list[str]:
        """Why this plan needs approval (empty: it does not)."""
        out = []
        total = self.points + self.stage2_points
        if total > MAX_PLAN_POINTS:
            out.append(f"{total} grid points (more than {MAX_PLAN_POINTS})")
        memory = self.cohort_bytes * min(self.concurrent, max(self.cohorts, 1))
        if memory > self.available_bytes:
            out.append(f"estimated memory {memory / 2**30:.1f} GiB beyond the {self.available_bytes / 2**30:.1f} GiB "
                       "available")
        if self.hours > MAX_PLAN_HOURS:
            out.append(f"estimated time {self.hours:.0f} h (more than {MAX_PLAN_HOURS:.0f} h)")
        return out

    def text(self) -> str:
        return (f"search plan: stage 1 {self.points} grid points in {self.cohorts} cohorts (largest "
                f"{self.largest_cohort} members, ~{self.cohort_bytes / 2**30:.2f} GiB each, {self.concurrent} at once, "
                f"{self.available_bytes / 2**30:.1f} GiB available); stage 2 at most {self.stage2_points} grid points; "
                f"roughly {self.hours:.1f} h")


def plan_search(search: SearchConfig, base: Path, store, run_dir: RunFolder, threads: int) -> SearchPlan:
    """The plan of the stage-1 grid points not yet finished, in cohorts as `run_stage` forms them, and an upper
    count of stage 2; the time assumes NOMINAL_FLOPS per trial thread and no speed-up from fusing members.

    Stage-1 points differ only in α, β (loss weights, shared by a cohort) and pooling, so one spec per pooling
    stands for all of its points: the plan of a search of any size costs a few config loads."""
    resumed = run_dir.exists("search.json")            # else nothing is finished: no look-up per point
    points = [p for p in search.stage1_points()
              if not (resumed and is_finished(run_dir, 1, point_name(p.alpha, p.beta, p.pooling)))]
    memory_gb = trial_memory_gb(search)
    cohorts, largest, cohort_bytes, flops, first = 0, 0, 0, 0.0, None
    for pooling in dict.fromkeys(p.pooling for p in points):
        n = sum(p.pooling == pooling for p in points)
        spec = stage1_specs(dataclasses.replace(search, points=[GridPoint(1.0, 1.0, pooling)], alpha=[], beta=[],
                                                pooling=[]), base, "cpu")[0]
        cost = member_cost(spec, store)
        first = first or (spec, cost)
        size = min(n, search.cohort_size or _members_fitting(memory_gb, cost.bytes))
        cohorts += math.ceil(n / size)
        largest = max(largest, size)
        cohort_bytes = max(cohort_bytes, size * cost.bytes)
        flops += n * cost.flops * spec.schedule["epochs"] * spec.schedule["samples_per_epoch"]
    stage2 = 0
    if 2 in search.stages and first is not None:
        spec, cost = first
        dim = sum(search.dim_parents.values()) if isinstance(search.dim_parents, dict) else search.dim_parents
        for task, n in (("cat", search.cat_parents * len(search.cat_variants)), ("dim", dim * len(search.sigma))):
            schedule = spec.config["finetune"][task]
            stage2 += n
            flops += n * cost.flops * schedule["epochs"] * schedule["samples_per_epoch"]
    concurrent = concurrent_trials(search)
    hours = flops / (NOMINAL_FLOPS * threads * min(concurrent, max(cohorts, 1))) / 3600
    return SearchPlan(len(points), stage2, cohorts, largest, cohort_bytes, concurrent, available_memory(), hours)


def group_cohorts(specs: list[TrialSpec], size_of: Any) -> list[CohortSpec]:
    """Cohorts of `specs` in grid order: grouped by `cohort_key`, split into chunks of `size_of(first spec)`."""
    groups: dict[str, list[TrialSpec]] = {}
    for spec in specs:
        groups.setdefault(cohort_key(spec), []).append(spec)
    cohorts, labels = [], {}
    for members in groups.values():
        first = members[0]
        label = first.pooling if first.stage == 1 else f"{first.task}__{first.parent}"
        size = size_of(first)
        for k in range(0, len(members), size):
            n = labels[label] = labels.get(label, -1) + 1
            cohorts.append(CohortSpec(first.stage, f"{label}-c{n}", members[k:k + size]))
    return cohorts


# -------------------------------------------------------------------------------------------------------------- trainable
def run_cohort(config: dict[str, Any], run_dir: str, store_url: str, threads: int, halving: dict | None,
               storage_options: dict | None = None) -> None:
    """The Ray Tune function trainable: train one cohort; each grid point's state follows every epoch.

    Members train in their work folders (`RunFolder.work_dir`) and each epoch's history and new best checkpoint are
    uploaded before state.json names them; a remote store is read from this node's cached copy."""
    import torch
    from ray import tune

    from mtser.config import AshaConfig
    from mtser.featurestore.cache import cached_store
    from mtser.trainer.checkpoint import SIDECAR
    from mtser.trainer.loop import Member, MemberEpoch, train_cohort

    torch.set_num_threads(threads)
    run = RunFolder(run_dir, storage_options)
    cohort = config["cohort"]
    members, keys = [], {}
    for spec in cohort["members"]:
        key = keys[spec["name"]] = trial_key(spec["stage"], spec["name"])
        run.remove(key)                                  # an unfinished earlier attempt restarts from scratch
        run.discard_work_dir(key)
        mark_state(run, spec["stage"], spec["name"], status="running", cohort=cohort["name"], best_epoch=None,
                   best_metrics=None, checkpoint=None, node=platform.node(), pid=os.getpid())
        members.append(Member(spec["name"], from_dict(Config, spec["config"]), run.work_dir(key),
                              "pretrain" if spec["stage"] == 1 else "finetune", spec.get("init_from") or None,
                              None if spec["stage"] == 1 else spec["task"], storage_options=storage_options))
    stages = {m["name"]: m["stage"] for m in cohort["members"]}
    select = {m.name: m.tc.select_metric for m in members}

    def on_epoch(epoch: int, reports: list[MemberEpoch]) -> None:
        objectives = {}
        for r in reports:
            key = keys[r.name]
            changes: dict[str, Any] = {"status": r.status}
            if r.row is not None:
                changes["epochs_run"] = epoch
                objectives[f"{r.name}/{OBJECTIVE}"] = r.row[select[r.name]]
                run.upload(run.work_dir(key) / "history.csv", f"{key}/history.csv")
            if r.best_dir is not None:
                run.upload(r.best_dir, f"{key}/best")
                changes.update(best_epoch=epoch, best_metrics=dict(r.row), checkpoint=run.url_of(f"{key}/best"))
            if r.error is not None:
                changes["error"] = r.error
            mark_state(run, stages[r.name], r.name, **changes)
        finite = [v for v in objectives.values() if math.isfinite(v)]
        tune.report({"epoch": epoch, "members": len(objectives), OBJECTIVE: max(finite, default=math.nan),
                     **objectives})

    asha = AshaConfig(**halving) if halving else None
    results = train_cohort(members, cached_store(store_url, storage_options), halving=asha, on_epoch=on_epoch,
                           store_url=store_url)
    for name, result in results.items():
        if result.test_metrics is not None:             # the trainer added them to best/ after the last epoch
            run.upload(result.best_checkpoint / SIDECAR, f"{keys[name]}/best/{SIDECAR}")
        mark_state(run, stages[name], name, status=result.status, epochs_run=len(result.history), error=result.error,
                   test_metrics=result.test_metrics)
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
    if search.cohort_size is None:
        store = open_store(store_url, storage_options=run_dir.storage_options)
        sizes: dict[str, int] = {}
        memory_gb = trial_memory_gb(search)
        cohorts = group_cohorts(pending, lambda s: sizes.setdefault(
            cohort_key(s), auto_cohort_size(s, store, memory_gb)))
    else:
        cohorts = group_cohorts(pending, lambda s: search.cohort_size)
    resources = trial_resources(search.resources, available_gpus())
    threads = max(1, int(round(resources["cpu"])))
    halving = dataclasses.asdict(search.asha) if search.asha is not None else None
    trainable = tune.with_resources(tune.with_parameters(run_cohort, run_dir=run_dir.url, store_url=store_url,
                                                         threads=threads, halving=halving,
                                                         storage_options=run_dir.storage_options), resources)
    attempt = len(run_dir.glob(f"ray/stage{stage}-*"))
    tuner = tune.Tuner(
        trainable,
        param_space={"cohort": tune.grid_search([dataclasses.asdict(c) for c in cohorts])},
        tune_config=tune.TuneConfig(max_concurrent_trials=search.max_concurrent or None,
                                    reuse_actors=True,      # later cohorts skip process start and imports
                                    trial_name_creator=lambda t: t.config["cohort"]["name"],
                                    trial_dirname_creator=lambda t: t.config["cohort"]["name"]),
        run_config=tune.RunConfig(name=f"stage{stage}-{attempt}", **run_dir.ray_storage("ray"),
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                  verbose=verbose),
    )
    grid = tuner.fit()
    for result in grid:
        cohort = (result.config or {}).get("cohort")    # cohorts an interruption left unstarted have no config
        if cohort is not None and result.error is not None:
            error = str(result.error).strip().splitlines()[-1][:500]
            if tell is not None:
                tell(cohort_failure(run_dir, cohort, result.error))
            for spec in cohort["members"]:
                if not is_finished(run_dir, spec["stage"], spec["name"]):
                    mark_state(run_dir, spec["stage"], spec["name"], status="failed", cohort=cohort["name"],
                               error=error)
    states = {s.name: _status(run_dir, s) for s in pending}
    failed = [name for name, status in states.items() if status == "failed"]
    unfinished = [name for name, status in states.items() if status not in FINISHED and status != "failed"]
    if unfinished:
        raise SearchError(f"stage {stage} interrupted; unfinished grid points {unfinished} (finish with --resume)")
    return [s.name for s in pending], failed, [c.name for c in cohorts]


def cohort_failure(run_dir: RunFolder, cohort: dict[str, Any], error: BaseException) -> str:
    """One line on a cohort whose Ray Tune trial ended in `error`: its grid points, the process (pid and host from
    the first member's state) and whether it died or raised, attempt 1 of 1 (a search retries no trial itself)."""
    from ray.exceptions import RayActorError

    first = cohort["members"][0]
    state = read_state(run_dir, first["stage"], first["name"])
    where = f"pid {state['pid']} on {state.get('node')}" if state.get("pid") else "not started"
    text = str(error)
    died = isinstance(error, RayActorError) or "ActorDiedError" in text or "died" in text.lower()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = (lines[0] if died else lines[-1]) if lines else type(error).__name__
    names = ", ".join(m["name"] for m in cohort["members"])
    what = "its trial process died" if died else "its trial raised"
    return (f"cohort {cohort['name']} (stage {first['stage']}, grid points {names}): {what} ({where}), attempt 1 of 1; "
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
    return [{k: v for k, v in dataclasses.asdict(s).items() if k != "config"} for s in specs]
