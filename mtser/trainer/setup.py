"""A cohort's set-up, resolved from its members' configs and the store before the first epoch: the data (`setup_data`:
splits, labels, readers), the fused model with the members' losses (`setup_model`) and the members' optimiser
(`setup_optimizer`). `loop.train_cohort` runs them, then its loop."""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mtser.configio import ConfigError
from mtser.errors import DataError
from mtser.featurestore.prefetch import prefetch
from mtser.trainer import data, layer_mix
from mtser.trainer.checkpoint import CheckpointError, check_store_matches, load_checkpoint
from mtser.trainer.cohort import CohortAdamW, MemberGradScaler, step_members
from mtser.trainer.config import Config, TrainConfig
from mtser.trainer.device import Precision, resolve_device, run_model
from mtser.trainer.losses import RecipeLoss, build_loss
from mtser.trainer.metrics import LabelArrays, computable, confusion_matrix
from mtser.trainer.model import FusionNetwork

if TYPE_CHECKING:
    from mtser.trainer.loop import Member


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


# -------------------------------------------------------------------------------------------------------- data
@dataclass
class CohortData:
    """The cohort's device, splits, labels and readers. Members select their best epoch on the Development split,
    or, with `validation`, on a part of Train held out by speaker (`data.selection_split`); Development is then the
    test split, scored once for the best checkpoints."""

    tc: TrainConfig                       # the schedule fields every member shares
    device: torch.device
    precision: Precision
    dims: dict[str, int]                  # the model's encoders and their feature dimensions
    layers: dict[str, list[int]]          # the stored hidden-state indices read per encoder (`layer_mix.read_layers`)
    provenance: dict                      # the store's URL and encoders, recorded in the checkpoints
    selection: str                        # the selection split, in words
    pools: dict[str, list[str]]           # Train ids of each task the members train
    task_rows: dict[str, set[str]] | None  # the same as sets where the members train different tasks
    train_pool: list[str]                 # their union: the ids the batch stream draws from
    train_lengths: dict[str, int]
    select_ids: list[str]                 # length-sorted
    select_labels: LabelArrays
    test_ids: list[str]                   # empty without `validation`
    test_labels: LabelArrays
    reader: data.BatchReader              # evaluation batches
    train_reader: data.BatchReader        # training batches; skips (and counts) unreadable utterances

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.tc.samples_per_epoch / self.tc.batch_size)

    @property
    def total_steps(self) -> int:
        return self.tc.epochs * self.steps_per_epoch

    def epoch_batches(self, epoch: int) -> data.WaitClock:
        """The epoch's training batches, read ahead in the background, timing the waits for them."""
        tc = self.tc
        ids = data.epoch_batches(self.train_pool, self.train_lengths, tc.samples_per_epoch, tc.batch_size, tc.seed,
                                 epoch, tc.length_buckets)
        return data.WaitClock(prefetch(self.train_reader, ids, depth=tc.prefetch_batches))

    def scores(self, model: FusionNetwork, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, N, 8) logits and (G, N, 3) attributes of a fused model on `ids`, read once."""
        batches = prefetch(self.reader, data.chunks(ids, self.tc.eval_batch_size), depth=self.tc.prefetch_batches)
        return run_model(model, batches, self.device, self.precision)

    def targets(self, task: str, batch: data.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's targets for a member training `task`: rows outside its task's pool carry no target (cohorts
        whose members train different tasks)."""
        if self.task_rows is None:
            return batch.classes, batch.attributes
        rows = self.task_rows[task]
        keep = torch.tensor([i in rows for i in batch.ids], device=batch.classes.device)
        return (torch.where(keep, batch.classes, -1),
                torch.where(keep[:, None], batch.attributes, torch.nan))


def setup_data(members: Sequence[Member], store, store_url: str | None = None) -> CohortData:
    """The cohort's data on the device its schedule names; checks that every member's select_metric can be computed
    on the selection split. `store_url`: the store's own URL when `store` is a local copy of it."""
    tc = members[0].tc
    device = resolve_device(tc.device)
    encoders = model_encoders(members[0].cfg, store)
    model_cfg = members[0].cfg.model
    layers = layer_mix.read_layers(model_cfg, {n: store.encoders[n] for n in encoders}, store.url)
    read = layer_mix.reader_layers(layers, layer_mix.mixed_layers(model_cfg, layers))
    provenance = {"url": store_url or store.url,
                  "encoders": {n: dataclasses.asdict(store.encoders[n]) for n in encoders}}
    development = data.evaluation_ids(store, encoders, "Development")
    if tc.validation is None:
        selection, held_out, select_ids, test_ids = "Development", [], development, []
    else:
        selection = f"Train held out ({tc.validation:g} by speaker, seed {tc.seed})"
        held_out = select_ids = data.selection_split(store, encoders, tc.validation, tc.seed)
        test_ids = data.length_sorted(store, development, encoders)
    pools = {task: data.training_ids(store, encoders, task, augmented=tc.use_augmented, exclude=held_out)
             for task in dict.fromkeys(m.tc.task for m in members)}       # in the members' order: reproducible
    for task, pool in pools.items():
        if not pool:
            raise DataError(f"store {store.url}: no Train utterance with features and labels for task {task!r}")
    train_pool = _union(pools.values())
    select_ids = data.length_sorted(store, select_ids, encoders)
    host, pin = data.host_dtype(device), device.type == "cuda"
    cd = CohortData(
        tc=tc, device=device, precision=Precision(device, tc.mixed_precision),
        dims={n: store.encoders[n].dim for n in encoders}, layers=layers, provenance=provenance, selection=selection,
        pools=pools,
        task_rows=None if len(pools) == 1 else {task: set(pool) for task, pool in pools.items()},
        train_pool=train_pool, train_lengths=data.total_lengths(store, train_pool, encoders),
        select_ids=select_ids, select_labels=data.label_arrays(store.utterances, select_ids),
        test_ids=test_ids, test_labels=data.label_arrays(store.utterances, test_ids),
        reader=data.BatchReader(store, encoders, host, pin_memory=pin, packed=pin, **read),
        train_reader=data.BatchReader(store, encoders, host, skip_unreadable=True, pin_memory=pin, packed=pin,
                                      **read))
    for m in members:
        if m.tc.select_metric not in computable(cd.select_labels):
            raise ConfigError(f"{m.section}.select_metric: {m.tc.select_metric!r} cannot be computed, the "
                              f"selection split ({selection}) of {store.url} lacks the labels "
                              f"({len(select_ids)} utterances)")
    return cd


def _union(pools: Iterable[list[str]]) -> list[str]:
    return list(dict.fromkeys(i for pool in pools for i in pool))


# ------------------------------------------------------------------------------------------------------- model
@dataclass
class ModelSetup:
    """What `setup_model` gives, in the members' order."""

    model: FusionNetwork                    # the members' initial models fused, on the device
    losses: list[RecipeLoss]              # per member
    best_models: list[FusionNetwork]        # per member, to hold its best epoch's weights (made here: a model's
                                          # initial weights draw from torch's generator, which dropout draws from)


def setup_model(members: Sequence[Member], store, cd: CohortData) -> ModelSetup:
    """The members' initial models (stage 1: seeded random weights; stage 2: the parent checkpoint) fused, and each
    member's loss (class weights from its task's pool, or with `confusion` from its parent's confusion matrix)."""
    initial = [_initial_model(m, cd, store) for m in members]
    confusions: dict[str | Path, np.ndarray] = {}
    losses = []
    for m, model in zip(members, initial):
        counts = data.class_counts(data.label_arrays(store.utterances, cd.pools[m.tc.task]))
        confusion = None
        if m.cfg.loss.class_weights == "confusion" and m.init_from is not None:
            if m.init_from not in confusions:
                confusions[m.init_from] = _confusion(cd, model)
            confusion = confusions[m.init_from]
        losses.append(build_loss(m.tc.task, m.cfg.loss, counts, confusion))
    fused = fused_model(initial, cd.device)
    return ModelSetup(fused, losses, [FusionNetwork(initial[0].encoder_dims, initial[0].cfg,
                                                    read_layers=cd.layers) for _ in members])


def fused_model(models: Sequence[FusionNetwork], device: torch.device) -> FusionNetwork:
    """Lone `models` (G = 1 each) stacked into one network of G members on `device` (the one place the loop builds
    one)."""
    return FusionNetwork.stack(models).to(device)


def _initial_model(member: Member, cd: CohortData, store) -> FusionNetwork:
    dims = cd.dims
    if member.stage == "pretrain":
        seed_everything(member.tc.seed)
        return FusionNetwork(dims, member.cfg.model, read_layers=cd.layers)
    if member.init_from is None:
        raise ValueError(f"{member.name}: finetune needs init_from (the stage-1 checkpoint)")
    parent, parent_cfg, meta = load_checkpoint(member.init_from, storage_options=member.storage_options)
    check_store_matches(meta, store)
    if parent.encoder_dims != dims or parent_cfg.model != member.cfg.model or parent.read_layers != cd.layers:
        raise CheckpointError(f"{member.init_from}: its model (encoders {parent.encoder_dims}, layers "
                              f"{parent.read_layers}, {parent_cfg.model}) differs from the config's (encoders {dims}, "
                              f"layers {cd.layers}, {member.cfg.model})")
    seed_everything(member.tc.seed)
    return parent


def _confusion(cd: CohortData, parent: FusionNetwork) -> np.ndarray:
    """The parent's confusion matrix on the selection split (for loss.class_weights: confusion)."""
    logits, _ = cd.scores(parent.to(cd.device), cd.select_ids)
    has_class = cd.select_labels.classes >= 0
    return confusion_matrix(cd.select_labels.classes[has_class], logits[0].numpy()[has_class].argmax(axis=1))


# --------------------------------------------------------------------------------------------------- optimiser
@dataclass
class MemberOptimizer:
    """Each member's AdamW state, float16 loss scale and gradient-clipping norm, in fused positions."""

    adamw: CohortAdamW
    scaler: MemberGradScaler
    clip: torch.Tensor

    def step(self, model: FusionNetwork, losses: torch.Tensor, lrs: list[float]) -> torch.Tensor:
        """`step_members` at the learning rates `lrs`; returns the members' finite-loss mask."""
        self.adamw.lr = torch.tensor(lrs, dtype=torch.float64, device=self.clip.device)
        return step_members(model, self.adamw, self.scaler, losses, self.clip)

    def select(self, model: FusionNetwork, keep: list[int]) -> None:
        """Keep the members at fused positions `keep` (after `model.select(keep)`)."""
        self.scaler.select(keep)
        self.adamw = self.adamw.select(model, keep)
        self.clip = self.clip[keep]


def setup_optimizer(model: FusionNetwork, schedules: Sequence[TrainConfig], cd: CohortData) -> MemberOptimizer:
    """The optimiser of the members whose schedules are `schedules`, in fused order."""
    return MemberOptimizer(CohortAdamW(model, torch.tensor([tc.lr for tc in schedules]),
                                       torch.tensor([tc.weight_decay for tc in schedules])),
                           MemberGradScaler(len(schedules), cd.device, cd.precision.loss_scaling),
                           torch.tensor([tc.grad_clip for tc in schedules], device=cd.device))
