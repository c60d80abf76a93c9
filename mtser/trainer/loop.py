"""Training (stage 1 multi-task, stage 2 task fine-tuning), prediction and evaluation over a feature store."""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mtser.config import Config, ConfigError, TrainConfig
from mtser.featurestore.labels import ATTRIBUTE_COLUMNS, ATTRIBUTES, CLASSES
from mtser.trainer import data
from mtser.trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mtser.trainer.losses import RecipeLoss, build_loss
from mtser.trainer.metrics import LabelArrays, computable, summarize
from mtser.trainer.model import FusionModel

Stage = Literal["pretrain", "finetune"]
EpochCallback = Callable[[int, dict[str, float], Path | None], None]
PROVENANCE_FIELDS = ("kind", "model", "revision", "content_hash", "layer", "mean_last_k", "dim")


@dataclass
class TrainResult:
    best_checkpoint: Path                 # <out>/best
    best_epoch: int
    best_metrics: dict[str, float]        # development metrics at the best epoch
    history: list[dict[str, float]]       # per epoch: epoch, lr, train_loss, data_wait_fraction, dev metrics


# ------------------------------------------------------------------------------------------------------ set-up
def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_if_url(store):
    """An open FeatureStore as given, or one opened read-only from its URL."""
    if not isinstance(store, (str, Path)):
        return store
    from mtser.featurestore.store import open_store

    return open_store(str(store))


def model_encoders(cfg: Config, store) -> list[str]:
    """Encoders fed to the model: model.encoders in order, or every store encoder sorted by name."""
    names = list(cfg.model.encoders) if cfg.model.encoders else sorted(store.encoders)
    missing = [n for n in names if n not in store.encoders]
    if missing:
        raise ConfigError(f"model.encoders: {missing} not in store {store.url} (has {sorted(store.encoders)})")
    return names


def check_store_matches(meta: dict, store) -> None:
    """The store's encoders must be the ones the checkpoint was trained on (same model, layer, dim, ...)."""
    for name, trained in meta["store"]["encoders"].items():
        info = store.encoders.get(name)
        if info is None:
            raise CheckpointError(f"store {store.url} lacks encoder {name!r} the checkpoint was trained on")
        current = dataclasses.asdict(info)
        differing = [f for f in PROVENANCE_FIELDS if current.get(f) != trained.get(f)]
        if differing:
            raise CheckpointError(f"store {store.url}: encoder {name!r} differs from the checkpoint's in "
                                  + ", ".join(f"{f} ({current.get(f)!r} vs {trained.get(f)!r})" for f in differing))


def finetune_config(cfg: Config, task: Literal["cat", "dim"], sigma: float | None = None) -> Config:
    """Stage-2 config: finetune.task, loss.sigma (dim only) and the selection metric that matches the task."""
    new = copy.deepcopy(cfg)
    new.finetune.task = task
    new.finetune.select_metric = "f1" if task == "cat" else "ccc_mean"
    new.loss.sigma = sigma if task == "dim" else None
    return new


def lr_factor(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step; returned relative to lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)
    floor = min_lr / lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Precision:
    """Mixed precision on CUDA (bfloat16 where supported, else float16 with loss scaling); float32 on CPU."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device_type = device.type
        self.enabled = enabled and device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


# ------------------------------------------------------------------------------------------------------ inference
@torch.no_grad()
def run_model(model: FusionModel, batches, device: torch.device, precision: Precision | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated (logits, attributes) of `batches` (each a Batch or a features dict), float32 on CPU."""
    model.eval()
    precision = precision or Precision(device, enabled=False)
    logits, attrs = [], []
    for batch in batches:
        features = data.features_to(batch.features if isinstance(batch, data.Batch) else batch, device)
        with precision.autocast():
            out_logits, out_attrs = model(features)
        logits.append(out_logits.float().cpu())
        attrs.append(out_attrs.float().cpu())
    return torch.cat(logits), torch.cat(attrs)


def _unsorted(order: np.ndarray, *arrays: torch.Tensor) -> list[np.ndarray]:
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return [a.numpy()[inverse] for a in arrays]


def predict(model: FusionModel, store, ids: list[str], batch_size: int = 256, device: str | torch.device = "cpu",
            prefetch_batches: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, 8) and attributes (N, 3) in 1..7 for `ids`, in that order."""
    device = torch.device(device)
    encoders = list(model.encoder_dims)
    order = np.argsort([sum(store.length(i, n) for n in encoders) for i in ids], kind="stable")
    sorted_ids = [ids[k] for k in order]
    reader = data.BatchReader(store, encoders, data.host_dtype(device))
    batches = data.prefetch(reader, data.chunks(sorted_ids, batch_size), depth=prefetch_batches)
    logits, attrs = run_model(model.to(device), batches, device)
    return tuple(_unsorted(order, torch.softmax(logits, dim=1), attrs))


def predict_features(model: FusionModel, features: list[dict[str, np.ndarray]], batch_size: int = 256,
                     device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Like `predict`, for in-memory features (encoder name -> (T, D) array per utterance)."""
    device = torch.device(device)
    encoders = list(model.encoder_dims)
    order = np.argsort([sum(len(f[n]) for n in encoders) for f in features], kind="stable")
    batches = (data.pad_features([features[k] for k in chunk], encoders, data.host_dtype(device))
               for chunk in data.chunks(order, batch_size))
    logits, attrs = run_model(model.to(device), batches, device)
    return tuple(_unsorted(order, torch.softmax(logits, dim=1), attrs))


def prediction_table(ids: Sequence[str], probs: np.ndarray, attrs: np.ndarray, labels: LabelArrays | None = None
                     ) -> pd.DataFrame:
    """One row per utterance: id, EmoClass (predicted letter), prob_<class>, EmoAct/EmoVal/EmoDom, true_* labels."""
    table = pd.DataFrame({"id": list(ids), "EmoClass": [CLASSES[k] for k in probs.argmax(axis=1)]})
    for k, c in enumerate(CLASSES):
        table[f"prob_{c}"] = probs[:, k]
    for k, name in enumerate(ATTRIBUTES):
        table[ATTRIBUTE_COLUMNS[name]] = attrs[:, k]
    if labels is not None:
        table["true_EmoClass"] = [CLASSES[k] if k >= 0 else None for k in labels.classes]
        for k, name in enumerate(ATTRIBUTES):
            table[f"true_{ATTRIBUTE_COLUMNS[name]}"] = labels.attributes[:, k]
    return table


def evaluate(checkpoint: Path, store, split: str = "Development", device: str = "auto"
             ) -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics of a checkpoint on `split` (original utterances, X dropped) and the per-utterance prediction table."""
    store = open_if_url(store)
    torch_device = resolve_device(device)
    model, cfg, meta = load_checkpoint(checkpoint, torch_device)
    check_store_matches(meta, store)
    ids = data.evaluation_ids(store, list(model.encoder_dims), split)
    if not ids:
        raise ValueError(f"store {store.url}: split {split!r} has no utterances with features for "
                         f"{list(model.encoder_dims)}")
    probs, attrs = predict(model, store, ids, cfg.train.eval_batch_size, torch_device)
    labels = data.label_arrays(store.utterances, ids)
    return summarize(probs, attrs, labels), prediction_table(ids, probs, attrs, labels)


# ------------------------------------------------------------------------------------------------------ training
class _Stage:
    """Everything one stage needs, resolved from config and store before the first epoch."""

    def __init__(self, cfg: Config, store, stage: Stage, init_from: Path | None):
        self.tc: TrainConfig = cfg.train if stage == "pretrain" else cfg.finetune
        self.device = resolve_device(self.tc.device)
        seed_everything(self.tc.seed)
        self.encoders = model_encoders(cfg, store)
        self.model = self._build_model(cfg, store, stage, init_from).to(self.device)
        self.train_pool = data.training_ids(store, self.encoders, self.tc.task)
        if not self.train_pool:
            raise ValueError(f"store {store.url}: no Train utterance with features and labels for task {self.tc.task!r}")
        self.train_lengths = data.total_lengths(store, self.train_pool, self.encoders)
        dev_ids = data.evaluation_ids(store, self.encoders, "Development")
        self.dev_ids = data.length_sorted(store, dev_ids, self.encoders)
        self.dev_labels = data.label_arrays(store.utterances, self.dev_ids)
        if self.tc.select_metric not in computable(self.dev_labels):
            key = "train" if stage == "pretrain" else "finetune"
            raise ConfigError(f"{key}.select_metric: {self.tc.select_metric!r} cannot be computed, the Development "
                              f"split of {store.url} lacks the labels ({len(self.dev_ids)} utterances)")
        train_labels = data.label_arrays(store.utterances, self.train_pool)
        self.loss: RecipeLoss = build_loss(self.tc.task, cfg.loss, data.class_counts(train_labels))
        self.reader = data.BatchReader(store, self.encoders, data.host_dtype(self.device))
        self.train_reader = data.BatchReader(store, self.encoders, data.host_dtype(self.device), skip_unreadable=True)
        self.precision = Precision(self.device, self.tc.mixed_precision)

    def _build_model(self, cfg: Config, store, stage: Stage, init_from: Path | None) -> FusionModel:
        dims = {n: store.encoders[n].dim for n in self.encoders}
        if stage == "pretrain":
            return FusionModel(dims, cfg.model)
        if init_from is None:
            raise ValueError("finetune: init_from (the stage-1 checkpoint) is required")
        parent, parent_cfg, meta = load_checkpoint(init_from)
        check_store_matches(meta, store)
        if parent.encoder_dims != dims or parent_cfg.model != cfg.model:
            raise CheckpointError(f"{init_from}: its model (encoders {parent.encoder_dims}, {parent_cfg.model}) "
                                  f"differs from the config's (encoders {dims}, {cfg.model})")
        return parent

    def evaluate(self) -> dict[str, float]:
        batches = data.prefetch(self.reader, data.chunks(self.dev_ids, self.tc.eval_batch_size),
                                depth=self.tc.prefetch_batches)
        logits, attrs = run_model(self.model, batches, self.device, self.precision)
        metrics = summarize(logits.numpy(), attrs.numpy(), self.dev_labels)
        loss = self.loss(logits, attrs, torch.from_numpy(self.dev_labels.classes),
                         torch.from_numpy(self.dev_labels.attributes))
        return {**metrics, "loss": float(loss)}


def train(cfg: Config, store, out_dir: Path, *, stage: Stage = "pretrain", init_from: Path | None = None,
          on_epoch: EpochCallback | None = None, progress: bool = False) -> TrainResult:
    """Train one stage; writes <out>/best (best Development checkpoint by select_metric) and <out>/history.csv."""
    store = open_if_url(store)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = _Stage(cfg, store, stage, init_from)
    tc, model = s.tc, s.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = math.ceil(tc.samples_per_epoch / tc.batch_size)
    total, warmup = tc.epochs * steps_per_epoch, round(tc.warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, tc.lr, tc.min_lr))
    provenance = {"url": store.url, "encoders": {n: dataclasses.asdict(store.encoders[n]) for n in s.encoders}}
    history: list[dict[str, float]] = []
    best_value, best_epoch, best_metrics = -math.inf, 0, {}
    for epoch in range(1, tc.epochs + 1):
        started = time.perf_counter()
        model.train()
        epoch_batches = data.epoch_batches(s.train_pool, s.train_lengths, tc.samples_per_epoch, tc.batch_size,
                                           tc.seed, epoch, tc.length_buckets)
        batches = data.WaitClock(data.prefetch(s.train_reader, epoch_batches, depth=tc.prefetch_batches))
        loss_sum, seen, skipped = 0.0, 0, 0
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{tc.epochs}", leave=False,
                   disable=None if progress else True)  # None: shown on a terminal only
        for batch in bar:
            batch = batch.to(s.device)
            with s.precision.autocast():
                logits, attrs = model(batch.features)
            loss = s.loss(logits, attrs, batch.classes, batch.attributes)
            if not torch.isfinite(loss):  # a bad feature must not poison the weights
                skipped += 1
                schedule.step()
                continue
            optimizer.zero_grad(set_to_none=True)
            s.precision.scaler.scale(loss).backward()
            s.precision.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            s.precision.scaler.step(optimizer)
            s.precision.scaler.update()
            schedule.step()
            loss_sum += loss.item() * len(batch.ids)
            seen += len(batch.ids)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        train_seconds = time.perf_counter() - started
        metrics = s.evaluate()
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / max(1, seen),
               "skipped_steps": skipped, "skipped_utterances": len(s.train_reader.skipped),
               "data_wait_fraction": batches.waited / train_seconds,
               "train_seconds": train_seconds, **metrics}
        history.append(row)
        pd.DataFrame(history).to_csv(out_dir / "history.csv", index=False)
        improved = best_epoch == 0 or metrics[tc.select_metric] > best_value  # NaN never wins after epoch 1
        if improved:
            best_value, best_epoch, best_metrics = metrics[tc.select_metric], epoch, metrics
            save_checkpoint(out_dir / "best", model, cfg, {
                "stage": stage, "task": tc.task, "epoch": epoch, "metrics": metrics, "store": provenance,
                "parent": str(init_from) if init_from else None, "train_utterances": len(s.train_pool),
                "unreadable_utterances": dict(s.train_reader.skipped)})
        if on_epoch is not None:
            on_epoch(epoch, row, out_dir / "best" if improved else None)
    return TrainResult(out_dir / "best", best_epoch, best_metrics, history)
