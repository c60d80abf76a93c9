"""Training: one model or a cohort of models that share one batch stream (stage 1 multi-task, stage 2 fine-tuning).

A cohort is G members of one architecture and schedule, trained as one `FusionNetwork` (G members): each batch is read
once and used by every member; each member has its own loss (α, β, σ, task), learning rate, clipping and AdamW
state, so it follows the trajectory it would follow alone. Each epoch the Development split is read once and
scored for all members. A member ends as `complete` (all epochs), `stopped` (successive halving, `halving`) or
`failed` (`nonfinite_patience` consecutive non-finite losses); ended members leave the fused tensors. Every member
writes what a model trained alone writes: <out>/best (its best Development checkpoint) and <out>/history.csv.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mtser.config import AshaConfig, Config, ConfigError, TrainConfig
from mtser.trainer import data
from mtser.trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, update_sidecar
from mtser.trainer.cohort import CohortAdamW, MemberGradScaler, step_members
from mtser.trainer.infer import Precision, check_store_matches, open_if_url, resolve_device, run_model
from mtser.trainer.losses import RecipeLoss, build_loss
from mtser.trainer.metrics import computable, confusion_matrix, summarize
from mtser.trainer.model import FusionNetwork

Stage = Literal["pretrain", "finetune"]
Status = Literal["running", "complete", "stopped", "failed"]
# Schedule fields every member of a cohort shares: they decide the batch stream (and the initial weights).
SHARED_FIELDS = ("epochs", "samples_per_epoch", "batch_size", "eval_batch_size", "seed", "length_buckets",
                 "prefetch_batches", "device", "mixed_precision", "validation", "use_augmented")


class DivergedError(ValueError):
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


# ------------------------------------------------------------------------------------------------------ set-up
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_encoders(cfg: Config, store) -> list[str]:
    """Encoders fed to the model: model.encoders in order, or every store encoder sorted by name."""
    names = list(cfg.model.encoders) if cfg.model.encoders else sorted(store.encoders)
    missing = [n for n in names if n not in store.encoders]
    if missing:
        raise ConfigError(f"model.encoders: {missing} not in store {store.url} (has {sorted(store.encoders)})")
    return names


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


def halving_milestones(asha: AshaConfig | None, epochs: int) -> set[int]:
    """Epochs at which successive halving ranks the members: grace·rf^k below the last epoch."""
    if asha is None:
        return set()
    milestones, m = set(), asha.grace_period
    while m < epochs:
        milestones.add(m)
        m *= asha.reduction_factor
    return milestones


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


class _Cohort:
    """Everything a cohort needs, resolved from the members' configs and the store before the first epoch.

    Members select their best epoch on the Development split, or, with `validation`, on a part of Train held out by
    speaker (`data.selection_split`); Development is then the test split, scored once for the best checkpoints."""

    def __init__(self, members: Sequence[Member], store, store_url: str | None = None):
        check_cohort(members)
        self.members = list(members)
        self.tc = members[0].tc                                   # the shared schedule fields
        self.device = resolve_device(self.tc.device)
        self.encoders = model_encoders(members[0].cfg, store)
        dims = {n: store.encoders[n].dim for n in self.encoders}
        self.provenance = {"url": store_url or store.url,
                           "encoders": {n: dataclasses.asdict(store.encoders[n]) for n in self.encoders}}
        development = data.evaluation_ids(store, self.encoders, "Development")
        if self.tc.validation is None:
            self.selection, held_out, self.test_ids = "Development", [], []
            select_ids = development
        else:
            self.selection = f"Train held out ({self.tc.validation:g} by speaker, seed {self.tc.seed})"
            held_out = select_ids = data.selection_split(store, self.encoders, self.tc.validation, self.tc.seed)
            self.test_ids = data.length_sorted(store, development, self.encoders)
        pools = {task: data.training_ids(store, self.encoders, task, augmented=self.tc.use_augmented,
                                         exclude=held_out) for task in {m.tc.task for m in members}}
        for task, pool in pools.items():
            if not pool:
                raise ValueError(f"store {store.url}: no Train utterance with features and labels for task {task!r}")
        self.train_pool = _union(pools.values())
        self.task_rows = None if len(pools) == 1 else {t: set(p) for t, p in pools.items()}
        self.train_lengths = data.total_lengths(store, self.train_pool, self.encoders)
        self.select_ids = data.length_sorted(store, select_ids, self.encoders)
        self.select_labels = data.label_arrays(store.utterances, self.select_ids)
        self.test_labels = data.label_arrays(store.utterances, self.test_ids)
        host, pin = data.host_dtype(self.device), self.device.type == "cuda"
        self.reader = data.BatchReader(store, self.encoders, host, pin_memory=pin, packed=pin)
        self.train_reader = data.BatchReader(store, self.encoders, host, skip_unreadable=True, pin_memory=pin,
                                             packed=pin)
        self.precision = Precision(self.device, self.tc.mixed_precision)
        for m in members:
            if m.tc.select_metric not in computable(self.select_labels):
                raise ConfigError(f"{m.section}.select_metric: {m.tc.select_metric!r} cannot be computed, the "
                                  f"selection split ({self.selection}) of {store.url} lacks the labels "
                                  f"({len(self.select_ids)} utterances)")
        initial = [self._initial_model(m, dims, store) for m in members]
        confusions: dict[Path, np.ndarray] = {}
        self.losses: list[RecipeLoss] = []
        for m, model in zip(members, initial):
            counts = data.class_counts(data.label_arrays(store.utterances, pools[m.tc.task]))
            confusion = None
            if m.cfg.loss.class_weights == "confusion" and m.init_from is not None:
                if m.init_from not in confusions:
                    confusions[m.init_from] = self._confusion(model)
                confusion = confusions[m.init_from]
            self.losses.append(build_loss(m.tc.task, m.cfg.loss, counts, confusion))
        self.model = FusionNetwork.stack(initial).to(self.device)

    def _initial_model(self, member: Member, dims: dict[str, int], store) -> FusionNetwork:
        if member.stage == "pretrain":
            seed_everything(member.tc.seed)
            return FusionNetwork(dims, member.cfg.model)
        if member.init_from is None:
            raise ValueError(f"{member.name}: finetune needs init_from (the stage-1 checkpoint)")
        parent, parent_cfg, meta = load_checkpoint(member.init_from, storage_options=member.storage_options)
        check_store_matches(meta, store)
        if parent.encoder_dims != dims or parent_cfg.model != member.cfg.model:
            raise CheckpointError(f"{member.init_from}: its model (encoders {parent.encoder_dims}, {parent_cfg.model}) "
                                  f"differs from the config's (encoders {dims}, {member.cfg.model})")
        seed_everything(member.tc.seed)
        return parent

    def _confusion(self, parent: FusionNetwork) -> np.ndarray:
        """The parent's confusion matrix on the selection split (for loss.class_weights: confusion)."""
        logits, _ = self.scores(parent.to(self.device), self.select_ids)
        has_class = self.select_labels.classes >= 0
        return confusion_matrix(self.select_labels.classes[has_class], logits[0].numpy()[has_class].argmax(axis=1))

    def scores(self, model: FusionNetwork, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, N, 8) logits and (G, N, 3) attributes of a fused model on `ids`, read once."""
        batches = data.prefetch(self.reader, data.chunks(ids, self.tc.eval_batch_size), depth=self.tc.prefetch_batches)
        return run_model(model, batches, self.device, self.precision)

    def member_targets(self, k: int, batch: data.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's targets for member k: rows outside its task's pool carry no target (mixed-task cohorts)."""
        if self.task_rows is None:
            return batch.classes, batch.attributes
        rows = self.task_rows[self.members[k].tc.task]
        keep = torch.tensor([i in rows for i in batch.ids], device=batch.classes.device)
        return (torch.where(keep, batch.classes, -1),
                torch.where(keep[:, None], batch.attributes, torch.nan))


def _union(pools) -> list[str]:
    return list(dict.fromkeys(i for pool in pools for i in pool))


# ------------------------------------------------------------------------------------------------------ training
def train_cohort(members: Sequence[Member], store, *, halving: AshaConfig | None = None,
                 on_epoch: EpochCallback | None = None, progress: bool = False,
                 store_url: str | None = None) -> dict[str, TrainResult]:
    """Train `members` as one fused cohort on one batch stream; returns each member's result by name.
    `store_url`: the store's own URL when `store` is a local copy of it (recorded in the checkpoints)."""
    store = open_if_url(store)
    c = _Cohort(members, store, store_url)
    tc, device = c.tc, c.device
    steps_per_epoch = math.ceil(tc.samples_per_epoch / tc.batch_size)
    total = tc.epochs * steps_per_epoch
    warmups = [round(m.tc.warmup_epochs * steps_per_epoch) for m in members]
    optimizer = CohortAdamW(c.model, torch.tensor([m.tc.lr for m in members]),
                            torch.tensor([m.tc.weight_decay for m in members]))
    clip = torch.tensor([m.tc.grad_clip for m in members], device=device)
    scaler = MemberGradScaler(len(members), device, c.precision.loss_scaling)
    alive = list(range(len(members)))                  # fused position -> member index
    status: list[Status] = ["running"] * len(members)
    errors: list[str | None] = [None] * len(members)
    histories: list[list[dict]] = [[] for _ in members]
    best = [(-math.inf, 0, {}) for _ in members]       # (value, epoch, metrics)
    nonfinite = [0] * len(members)
    exports = [FusionNetwork(c.model.encoder_dims, c.model.cfg) for _ in members]
    milestones = halving_milestones(halving, tc.epochs)
    for m in members:
        m.out_dir.mkdir(parents=True, exist_ok=True)

    def lrs(step: int) -> list[float]:
        return [members[k].tc.lr * lr_factor(step, total, warmups[k], members[k].tc.lr, members[k].tc.min_lr)
                for k in alive]

    step = 0
    for epoch in range(1, tc.epochs + 1):
        if not alive:
            break
        started = time.perf_counter()
        c.model.train()
        epoch_batches = data.epoch_batches(c.train_pool, c.train_lengths, tc.samples_per_epoch, tc.batch_size,
                                           tc.seed, epoch, tc.length_buckets)
        batches = data.WaitClock(data.prefetch(c.train_reader, epoch_batches, depth=tc.prefetch_batches))
        loss_sums, seen, skipped = [0.0] * len(members), [0] * len(members), [0] * len(members)
        ended: list[MemberEpoch] = []
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{tc.epochs}", leave=False,
                   disable=None if progress else True)  # None: shown on a terminal only
        for batch in bar:
            batch = batch.to(device)
            with c.precision.autocast():
                logits, attrs = c.model(batch.features)
            losses = torch.stack([c.losses[k](logits[g], attrs[g], *c.member_targets(k, batch))
                                  for g, k in enumerate(alive)])
            optimizer.lr = torch.tensor(lrs(step), dtype=torch.float64, device=device)
            finite = step_members(c.model, optimizer, scaler, losses, clip)
            step += 1
            values, ok = losses.detach().cpu().tolist(), finite.cpu().tolist()
            diverged = []
            for g, k in enumerate(alive):
                if ok[g]:
                    nonfinite[k] = 0
                    loss_sums[k] += values[g] * len(batch.ids)
                    seen[k] += len(batch.ids)
                    continue
                skipped[k] += 1
                nonfinite[k] += 1
                if nonfinite[k] >= members[k].tc.nonfinite_patience:
                    diverged.append(g)
                    status[k] = "failed"
                    errors[k] = (f"diverged: non-finite training loss in {nonfinite[k]} consecutive steps "
                                 f"(epoch {epoch}, step {step})")
                    ended.append(MemberEpoch(members[k].name, epoch, None, None, "failed", errors[k]))
            if diverged:
                keep = [g for g in range(len(alive)) if g not in diverged]
                alive = [alive[g] for g in keep]
                if not alive:
                    break
                optimizer, clip = _select(c.model, optimizer, scaler, keep), clip[keep]
            if seen[alive[0]]:
                bar.set_postfix(loss=f"{loss_sums[alive[0]] / seen[alive[0]]:.4f}")
        train_seconds = time.perf_counter() - started
        reports = list(ended)
        if alive:
            evaluation = _evaluate(c, alive)
            next_lrs = lrs(step)
            for g, k in enumerate(alive):
                member = members[k]
                row = {"epoch": epoch, "lr": next_lrs[g], "train_loss": loss_sums[k] / max(1, seen[k]),
                       "skipped_steps": skipped[k], "skipped_utterances": len(c.train_reader.skipped),
                       "data_wait_fraction": batches.waited / train_seconds, "train_seconds": train_seconds,
                       **evaluation[g]}
                histories[k].append(row)
                pd.DataFrame(histories[k]).to_csv(member.out_dir / "history.csv", index=False)
                value = row[member.tc.select_metric]
                improved = best[k][1] == 0 or value > best[k][0]     # NaN never wins after epoch 1
                if improved:
                    best[k] = (value, epoch, evaluation[g])
                    exports[k].load_member(0, c.model.member_state(g))
                    save_checkpoint(member.out_dir / "best", exports[k], member.cfg, {
                        "stage": member.stage, "task": member.tc.task, "epoch": epoch, "metrics": evaluation[g],
                        "store": c.provenance, "parent": str(member.init_from) if member.init_from else None,
                        "selection_split": c.selection,
                        "train_utterances": len(c.train_pool), "unreadable_utterances": dict(c.train_reader.skipped),
                        "cohort": {"members": len(members), "name": member.name}})
                if epoch == tc.epochs:
                    status[k] = "complete"
                reports.append(MemberEpoch(member.name, epoch, row, member.out_dir / "best" if improved else None,
                                           status[k]))
            if epoch in milestones and len(alive) > 1:
                keep = _halve(alive, evaluation, members, halving.reduction_factor)
                for g, k in enumerate(alive):
                    if g not in keep:
                        status[k] = "stopped"
                        reports = [r if r.name != members[k].name else dataclasses.replace(r, status="stopped")
                                   for r in reports]
                alive = [alive[g] for g in keep]
                optimizer, clip = _select(c.model, optimizer, scaler, keep), clip[keep]
        if on_epoch is not None:
            on_epoch(epoch, reports)
    tested = [k for k in range(len(members)) if best[k][1]] if c.test_ids else []
    test_metrics = dict(zip(tested, _test(c, [exports[k] for k in tested]))) if tested else {}
    results = {}
    for k, m in enumerate(members):
        value, best_epoch, metrics = best[k]
        if k in test_metrics:
            update_sidecar(m.out_dir / "best", test_split="Development", test_metrics=test_metrics[k])
        results[m.name] = TrainResult(m.out_dir / "best" if best_epoch else None, best_epoch, metrics, histories[k],
                                      status[k] if status[k] != "running" else "complete", errors[k],
                                      test_metrics.get(k))
    return results


def _select(model: FusionNetwork, optimizer: CohortAdamW, scaler: MemberGradScaler, keep: list[int]) -> CohortAdamW:
    model.select(keep)
    scaler.select(keep)
    return optimizer.select(model, keep)


def _halve(alive: list[int], evaluation: list[dict[str, float]], members: Sequence[Member], factor: int) -> list[int]:
    """Fused positions kept by successive halving: the best ceil(n / factor) members by their own objective."""
    def objective(g: int) -> float:
        value = evaluation[g].get(members[alive[g]].tc.select_metric, math.nan)
        return -math.inf if not math.isfinite(value) else value

    ranked = sorted(range(len(alive)), key=lambda g: (-objective(g), members[alive[g]].name))
    return sorted(ranked[:math.ceil(len(alive) / factor)])


def _evaluate(c: _Cohort, alive: list[int]) -> list[dict[str, float]]:
    """Selection-split metrics and loss of every alive member, from one read of the split's batches."""
    logits, attrs = c.scores(c.model, c.select_ids)
    classes, attributes = torch.from_numpy(c.select_labels.classes), torch.from_numpy(c.select_labels.scored_attributes)
    out = []
    for g, k in enumerate(alive):
        metrics = summarize(logits[g].numpy(), attrs[g].numpy(), c.select_labels)
        out.append({**metrics, "loss": float(c.losses[k](logits[g], attrs[g], classes, attributes))})
    return out


def _test(c: _Cohort, models: list[FusionNetwork]) -> list[dict[str, float]]:
    """Metrics of the members' best models on the test split (Development), fused for one read."""
    logits, attrs = c.scores(FusionNetwork.stack(models).to(c.device), c.test_ids)
    return [summarize(logits[g].numpy(), attrs[g].numpy(), c.test_labels) for g in range(len(models))]


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
