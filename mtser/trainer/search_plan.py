"""How large a search is before it runs: members per cohort by estimated memory, cohorts at once by CPUs, and the
plan (points, cohorts, memory, hours) a large search must have approved (`mtser tune --yes`).

No Ray; torch only inside the estimates (`cohort.member_bytes`, `member_flops`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mtser.trainer.grid import CohortSpec, TrialSpec, group_cohorts, stage1_specs
from mtser.trainer.runs import RunFolder, is_finished
from mtser.trainer.search_config import GridPoint, SearchConfig, architecture


@dataclass
class MemberCost:
    """What one member of `spec`'s architecture costs to train: memory (cohort.member_bytes) and rough FLOPs per
    training sample (cohort.member_flops)."""

    bytes: int
    flops: float


def member_cost(spec: TrialSpec, store) -> MemberCost:
    from mtser.trainer.cohort import member_bytes, member_flops
    from mtser.trainer.data import training_ids

    cfg = spec.config
    encoders = list(cfg.model.encoders) if cfg.model.encoders else sorted(store.encoders)
    ids = training_ids(store, encoders, spec.task)
    frames = {n: int(np.percentile([store.length(i, n) for i in ids], 95)) if ids else 1 for n in encoders}
    dims = {n: store.encoders[n].dim for n in encoders}
    return MemberCost(member_bytes(dims, cfg.model, spec.schedule.batch_size, frames),
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

    Stage-1 points differ only in α, β (loss weights, shared by a cohort), pooling and grid axes, so one spec per
    pooling and axes stands for all of its points: the plan of a search of any size costs a few config loads."""
    resumed = run_dir.exists("search.json")            # else nothing is finished: no look-up per point
    points = [p for p in search.stage1_points()
              if not (resumed and is_finished(run_dir, 1, p.name))]
    memory_gb = trial_memory_gb(search)
    cohorts, largest, cohort_bytes, flops, first = 0, 0, 0, 0.0, None
    kinds: dict[str, list[GridPoint]] = {}
    for p in points:
        kinds.setdefault(architecture(p.pooling, p.axes), []).append(p)
    for group in kinds.values():
        n, p = len(group), group[0]
        spec = stage1_specs(dataclasses.replace(search, points=[GridPoint(1.0, 1.0, p.pooling, axes=p.axes)], alpha=[],
                                                beta=[], pooling=[], axes={}), base, "cpu")[0]
        cost = member_cost(spec, store)
        first = first or (spec, cost)
        size = min(n, search.cohort_size or _members_fitting(memory_gb, cost.bytes))
        cohorts += math.ceil(n / size)
        largest = max(largest, size)
        cohort_bytes = max(cohort_bytes, size * cost.bytes)
        flops += n * cost.flops * spec.schedule.epochs * spec.schedule.samples_per_epoch
    stage2 = 0
    if 2 in search.stages and first is not None:
        spec, cost = first
        dim = sum(search.dim_parents.values()) if isinstance(search.dim_parents, dict) else search.dim_parents
        for task, n in (("cat", search.cat_parents * len(search.cat_variants)), ("dim", dim * len(search.sigma))):
            schedule = spec.config.schedule("finetune", task)
            stage2 += n
            flops += n * cost.flops * schedule.epochs * schedule.samples_per_epoch
    concurrent = concurrent_trials(search)
    hours = flops / (NOMINAL_FLOPS * threads * min(concurrent, max(cohorts, 1))) / 3600
    return SearchPlan(len(points), stage2, cohorts, largest, cohort_bytes, concurrent, available_memory(), hours)


def plan_cohorts(specs: list[TrialSpec], search: SearchConfig, open_store: Callable[[], Any]) -> list[CohortSpec]:
    """Cohorts of `specs` (`group_cohorts`): `cohort_size` members each, or else as many as `trial_memory_gb` holds
    by each architecture's estimate on the store `open_store()` opens."""
    if search.cohort_size is not None:
        return group_cohorts(specs, lambda s: search.cohort_size)
    store, memory_gb = open_store(), trial_memory_gb(search)
    return group_cohorts(specs, lambda s: auto_cohort_size(s, store, memory_gb))
