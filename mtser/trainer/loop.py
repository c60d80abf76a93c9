"""Training: one model or a cohort of models that share one batch stream (stage 1 multi-task, stage 2 fine-tuning).

A cohort is G members of one architecture and schedule, trained as one `FusionNetwork` (G members): each batch is read
once and used by every member; each member has its own loss (α, β, σ, task), learning rate, clipping and AdamW
state, so it follows the trajectory it would follow alone. Each epoch the Development split is read once and
scored for all members. A member ends as `complete` (all epochs), `stopped` (successive halving, `halving`) or
`failed` (`nonfinite_patience` consecutive non-finite losses); ended members leave the fused tensors. Every member
writes what a model trained alone writes: <out>/best (its best Development checkpoint) and <out>/history.csv.

`train_cohort` sets up (`setup.setup_data`, `setup_model`, `setup_optimizer`), then runs the loop: per epoch, per
batch the forward, the members' losses and their step; after the epoch `evaluate_and_save` and `halve`. All of a
member's state is one `MemberState`, which holds the member's position in the fused model.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from mtser.configio import ConfigError
from mtser.errors import DataError
from mtser.trainer.checkpoint import save_checkpoint, update_sidecar
from mtser.trainer.config import Config, TrainConfig
from mtser.trainer.data import open_if_url
from mtser.trainer.losses import RecipeLoss
from mtser.trainer.metrics import summarize
from mtser.trainer.model import FusionNetwork
from mtser.trainer.runs import write_csv_atomic
from mtser.trainer.search_config import AshaConfig
from mtser.trainer.selection import halving_milestones, halving_survivors, improves
from mtser.trainer.setup import (CohortData, MemberOptimizer, ModelSetup, fused_model, setup_data, setup_model,
                                 setup_optimizer)

Stage = Literal["pretrain", "finetune"]
Status = Literal["running", "complete", "stopped", "failed"]
# Schedule fields every member of a cohort shares: they decide the batch stream (and the initial weights).
SHARED_FIELDS = ("epochs", "samples_per_epoch", "batch_size", "eval_batch_size", "seed", "length_buckets",
                 "prefetch_batches", "device", "mixed_precision", "validation", "use_augmented")


class DivergedError(DataError):
    """A model trained alone produced non-finite losses `nonfinite_patience` steps in a row."""


@dataclass
class Member:
    """One model of a cohort: a name, its full recipe, its stage, its output folder and (stage 2) its parent and
    task (which `finetune` section it trains with)."""

    name: str
    cfg: Config
    out_dir: Path
    stage: Stage = "pretrain"
    init_from: str | Path | None = None           # a local checkpoint directory or its URL
    task: Literal["cat", "dim"] | None = None
    storage_options: dict | None = None           # fsspec options where init_from is a URL

    @property
    def tc(self) -> TrainConfig:
        return self.cfg.schedule(self.stage, self.task)

    @property
    def section(self) -> str:
        return "train" if self.stage == "pretrain" else f"finetune.{self.task}"


@dataclass
class TrainResult:
    best_checkpoint: Path | None          # <out>/best; None if the member never finished an epoch
    best_epoch: int
    best_metrics: dict[str, float]        # development metrics at the best epoch
    history: list[dict[str, float]]       # per epoch: epoch, lr, train_loss, data_wait_fraction, dev metrics
    status: Status = "complete"
    error: str | None = None              # why a member failed
    test_metrics: dict[str, float] | None = None  # the best checkpoint on Development when it selected on a
                                                  # held-out part of Train (`validation`)


@dataclass
class MemberEpoch:
    """What `on_epoch` receives per member after each epoch (and once more for a member that failed mid-epoch)."""

    name: str
    epoch: int
    row: dict[str, float] | None          # the history row (None: failed before the epoch's evaluation)
    best_dir: Path | None                 # set when this epoch wrote a new best checkpoint
    status: Status
    error: str | None = None


EpochCallback = Callable[[int, list[MemberEpoch]], None]


@dataclass
class MemberState:
    """One member while its cohort trains: its recipe, its position in the fused model, its history and best epoch."""

    member: Member
    index: int                            # its position in the fused model while it runs
    tc: TrainConfig                       # its schedule
    loss: RecipeLoss
    warmup_steps: int
    best_model: FusionNetwork               # holds its best epoch's weights; made at set-up, as a model's initial
                                          # weights draw from torch's generator, which dropout draws from in training
    status: Status = "running"
    error: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0                   # 0: no epoch evaluated yet
    best_value: float = -math.inf         # select_metric at best_epoch
    best_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] | None = None
    nonfinite: int = 0                    # consecutive steps with a non-finite training loss
    loss_sum: float = 0.0                 # this epoch: Σ loss · utterances over its finite steps, those utterances,
    seen: int = 0                         # and the steps it skipped for a non-finite loss
    skipped: int = 0

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def best_dir(self) -> Path:
        return self.member.out_dir / "best"

    def lr(self, step: int, total_steps: int) -> float:
        return self.tc.lr * lr_factor(step, total_steps, self.warmup_steps, self.tc.lr, self.tc.min_lr)

    def result(self) -> TrainResult:
        return TrainResult(self.best_dir if self.best_epoch else None, self.best_epoch, self.best_metrics,
                           self.history, self.status if self.status != "running" else "complete", self.error,
                           self.test_metrics)


# ----------------------------------------------------------------------------------------------------- helpers
def finetune_config(cfg: Config, task: Literal["cat", "dim"], sigma: float | None = None) -> Config:
    """Stage-2 config of `task`: loss.sigma for dim (None: plain MSE), none for cat."""
    new = copy.deepcopy(cfg)
    new.loss.sigma = sigma if task == "dim" else None
    return new


def lr_factor(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step; returned relative to lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)
    floor = min_lr / lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_cohort(members: Sequence[Member]) -> None:
    """Members must share the architecture and the schedule fields that decide the batch stream."""
    if not members:
        raise ValueError("a cohort needs at least one member")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"cohort member names must be unique, got {names}")
    first = members[0]
    for m in members[1:]:
        if m.cfg.model != first.cfg.model:
            raise ConfigError(f"cohort member {m.name!r}: model {m.cfg.model} differs from {first.name!r}'s "
                              f"{first.cfg.model} (one architecture per cohort)")
        differing = [f for f in SHARED_FIELDS if getattr(m.tc, f) != getattr(first.tc, f)]
        if differing:
            raise ConfigError(f"cohort member {m.name!r}: schedule differs from {first.name!r}'s in {differing}")


# ---------------------------------------------------------------------------------------------------- training
def train_cohort(members: Sequence[Member], store, *, halving: AshaConfig | None = None,
                 on_epoch: EpochCallback | None = None, progress: bool = False,
                 store_url: str | None = None) -> dict[str, TrainResult]:
    """Train `members` as one fused cohort on one batch stream; returns each member's result by name.
    `store_url`: the store's own URL when `store` is a local copy of it (recorded in the checkpoints)."""
    store = open_if_url(store)
    check_cohort(members)
    cd = setup_data(members, store, store_url)
    setup = setup_model(members, store, cd)
    model, states = setup.model, _member_states(members, setup, cd)
    optimizer = setup_optimizer(model, [s.tc for s in states], cd)
    tc, step = cd.tc, 0
    milestones = halving_milestones(halving, tc.epochs)
    for epoch in range(1, tc.epochs + 1):
        running = [s for s in states if s.running]
        if not running:
            break
        started, reports = time.perf_counter(), []
        model.train()
        for s in running:
            s.loss_sum, s.seen, s.skipped = 0.0, 0, 0
        batches = cd.epoch_batches(epoch)
        bar = tqdm(batches, total=cd.steps_per_epoch, desc=f"epoch {epoch}/{tc.epochs}", leave=False,
                   disable=None if progress else True)  # None: shown on a terminal only
        for batch in bar:
            batch = batch.to(cd.device)
            with cd.precision.autocast():
                logits, attrs = model(batch.features)
            losses = torch.stack([s.loss(logits[s.index], attrs[s.index], *cd.targets(s.tc.task, batch))
                                  for s in running])
            finite = optimizer.step(model, losses, [s.lr(step, cd.total_steps) for s in running])
            step += 1
            failed = _count_step(running, losses, finite, len(batch.ids), epoch, step)
            if failed:
                reports += failed
                running = [s for s in running if s.running]
                if not running:
                    break
                _keep_members(model, optimizer, running)
            if running[0].seen:
                bar.set_postfix(loss=f"{running[0].loss_sum / running[0].seen:.4f}")
        train_seconds = time.perf_counter() - started
        if running:
            timing = {"data_wait_fraction": batches.waited / train_seconds, "train_seconds": train_seconds}
            reports += evaluate_and_save(model, cd, running, epoch, [s.lr(step, cd.total_steps) for s in running],
                                         timing, cohort_size=len(states))
            if epoch in milestones and len(running) > 1:
                reports = halve(model, optimizer, running, reports, halving.reduction_factor)
        if on_epoch is not None:
            on_epoch(epoch, reports)
    _test_best(cd, states)
    return {s.member.name: s.result() for s in states}


def _member_states(members: Sequence[Member], setup: ModelSetup, cd: CohortData) -> list[MemberState]:
    """Each member's state at its position in the fused model; its output folder made."""
    states = []
    for k, m in enumerate(members):
        tc = m.tc
        states.append(MemberState(m, k, tc, setup.losses[k], round(tc.warmup_epochs * cd.steps_per_epoch),
                                  setup.best_models[k]))
        m.out_dir.mkdir(parents=True, exist_ok=True)
    return states


def _count_step(running: list[MemberState], losses: torch.Tensor, finite: torch.Tensor, utterances: int,
                epoch: int, step: int) -> list[MemberEpoch]:
    """Add a step's losses to the running members' epoch; a member whose loss has been non-finite
    `nonfinite_patience` steps in a row fails. Returns the reports of the members that failed."""
    failed = []
    for s, loss, ok in zip(running, losses.detach().cpu().tolist(), finite.cpu().tolist()):
        if ok:
            s.nonfinite = 0
            s.loss_sum += loss * utterances
            s.seen += utterances
            continue
        s.skipped += 1
        s.nonfinite += 1
        if s.nonfinite >= s.tc.nonfinite_patience:
            s.status = "failed"
            s.error = (f"diverged: non-finite training loss in {s.nonfinite} consecutive steps "
                       f"(epoch {epoch}, step {step})")
            failed.append(MemberEpoch(s.member.name, epoch, None, None, "failed", s.error))
    return failed


def _keep_members(model: FusionNetwork, optimizer: MemberOptimizer, kept: list[MemberState]) -> None:
    """Only the members `kept` (in fused order) stay in the fused model and its optimiser, renumbered from 0."""
    positions = [s.index for s in kept]
    model.select(positions)
    optimizer.select(model, positions)
    for index, s in enumerate(kept):
        s.index = index


def evaluate_and_save(model: FusionNetwork, cd: CohortData, running: list[MemberState], epoch: int, lrs: list[float],
                      timing: dict[str, float], cohort_size: int) -> list[MemberEpoch]:
    """Score the running members on the selection split (one read), add each one's row to its history.csv and save
    its checkpoint where the epoch is its best so far; returns their reports."""
    logits, attrs = cd.scores(model, cd.select_ids)
    labels = cd.select_labels
    classes, attributes = torch.from_numpy(labels.classes), torch.from_numpy(labels.scored_attributes)
    reports = []
    for s, lr in zip(running, lrs):
        g = s.index
        metrics = {**summarize(logits[g].numpy(), attrs[g].numpy(), labels),
                   "loss": float(s.loss(logits[g], attrs[g], classes, attributes))}
        row = {"epoch": epoch, "lr": lr, "train_loss": s.loss_sum / max(1, s.seen), "skipped_steps": s.skipped,
               "skipped_utterances": len(cd.train_reader.skipped), **timing, **metrics}
        s.history.append(row)
        write_csv_atomic(pd.DataFrame(s.history), s.member.out_dir / "history.csv")
        improved = improves(row[s.tc.select_metric], s.best_value, s.best_epoch)
        if improved:
            s.best_value, s.best_epoch, s.best_metrics = row[s.tc.select_metric], epoch, metrics
            _save_best(model, cd, s, cohort_size)
        if epoch == cd.tc.epochs:
            s.status = "complete"
        reports.append(MemberEpoch(s.member.name, epoch, row, s.best_dir if improved else None, s.status))
    return reports


def _save_best(model: FusionNetwork, cd: CohortData, s: MemberState, cohort_size: int) -> None:
    """Member `s`'s weights now as its best checkpoint, <out>/best."""
    m = s.member
    s.best_model.load_member(0, model.member_state(s.index))
    save_checkpoint(s.best_dir, s.best_model, m.cfg, {
        "stage": m.stage, "task": s.tc.task, "epoch": s.best_epoch, "metrics": s.best_metrics,
        "store": cd.provenance, "parent": str(m.init_from) if m.init_from else None, "selection_split": cd.selection,
        "train_utterances": len(cd.train_pool), "unreadable_utterances": dict(cd.train_reader.skipped),
        "cohort": {"members": cohort_size, "name": m.name}})


def halve(model: FusionNetwork, optimizer: MemberOptimizer, running: list[MemberState], reports: list[MemberEpoch],
          factor: int) -> list[MemberEpoch]:
    """Successive halving: the best ceil(n / factor) running members by their select metric this epoch go on; the
    others stop and leave the fused model. Returns `reports` with the stopped members' status."""
    keep = halving_survivors([s.member.name for s in running],
                             [s.history[-1].get(s.tc.select_metric, math.nan) for s in running], factor)
    stopped = {s.member.name for g, s in enumerate(running) if g not in keep}
    for s in running:
        if s.member.name in stopped:
            s.status = "stopped"
    _keep_members(model, optimizer, [running[g] for g in keep])
    return [dataclasses.replace(r, status="stopped") if r.name in stopped else r for r in reports]


def _test_best(cd: CohortData, states: list[MemberState]) -> None:
    """With a held-out selection split: every member's best checkpoint scored on the test split (Development) in one
    fused read, the metrics added to its sidecar."""
    tested = [s for s in states if s.best_epoch] if cd.test_ids else []
    if not tested:
        return
    logits, attrs = cd.scores(fused_model([s.best_model for s in tested], cd.device), cd.test_ids)
    for g, s in enumerate(tested):
        s.test_metrics = summarize(logits[g].numpy(), attrs[g].numpy(), cd.test_labels)
    for s in tested:
        update_sidecar(s.best_dir, test_split="Development", test_metrics=s.test_metrics)


def train(cfg: Config, store, out_dir: Path, *, stage: Stage = "pretrain", task: Literal["cat", "dim"] | None = None,
          init_from: str | Path | None = None, on_epoch: Callable[[int, dict[str, float], Path | None], None] | None = None,
          progress: bool = False, storage_options: dict | None = None) -> TrainResult:
    """Train one model (a cohort of one) with `cfg.schedule(stage, task)`; writes <out>/best (the best checkpoint
    on the selection split by select_metric) and <out>/history.csv. Raises DivergedError when the loss stays
    non-finite. The store and `init_from` may be URLs (`storage_options` apply to both); `out_dir` is local."""
    member = Member("model", cfg, Path(out_dir), stage, init_from or None, task, storage_options=storage_options)

    def report(epoch: int, reports: list[MemberEpoch]) -> None:
        for r in reports:
            if r.row is not None and on_epoch is not None:
                on_epoch(epoch, r.row, r.best_dir)

    result = train_cohort([member], open_if_url(store, storage_options), on_epoch=report, progress=progress)["model"]
    if result.status == "failed":
        raise DivergedError(f"{out_dir}: training {result.error}")
    return result
