"""Inference: one predict path for store ids and for in-memory features (every member of a `FusionNetwork` from one
read of the features; `fused_groups` fuses the models of one architecture), the prediction table, `evaluate`, and
the check that a store holds the features a checkpoint was trained on."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtser.errors import DataError
from mtser.featurestore.labels import ATTRIBUTE_COLUMNS, ATTRIBUTE_RANGE, ATTRIBUTES, CLASSES
from mtser.featurestore.prefetch import prefetch
from mtser.trainer import data
from mtser.trainer.checkpoint import check_store_matches, load_checkpoint
from mtser.trainer.data import open_if_url
from mtser.trainer.device import resolve_device, run_model
from mtser.trainer.metrics import LabelArrays, summarize
from mtser.trainer.model import FusionNetwork


def _unsorted(order: np.ndarray, *arrays: torch.Tensor) -> list[np.ndarray]:
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return [a.numpy()[:, inverse] for a in arrays]


def predict(model: FusionNetwork, store, ids: list[str], batch_size: int = 256, device: str | torch.device = "cpu",
            prefetch_batches: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (G, N, 8) and attributes (G, N, 3) in 1..7 of the G members for store `ids`, in that
    order (the stored layers the model reads: `FusionNetwork.reader_layers`)."""
    device = torch.device(device)
    encoders = list(model.encoder_dims)
    order = np.argsort([sum(store.length(i, n) for n in encoders) for i in ids], kind="stable")
    sorted_ids = [ids[k] for k in order]
    gpu = device.type == "cuda"
    reader = data.BatchReader(store, encoders, data.host_dtype(device), pin_memory=gpu, packed=gpu,
                              **model.reader_layers())
    batches = prefetch(reader, data.chunks(sorted_ids, batch_size), depth=prefetch_batches)
    logits, attrs = run_model(model.to(device), batches, device)
    return tuple(_unsorted(order, torch.softmax(logits, dim=-1), attrs))


def predict_features(model: FusionNetwork, features: list[dict[str, np.ndarray]], batch_size: int = 256,
                     device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Like `predict`, for in-memory features (encoder name -> (T, D) array per utterance, (T, L, D) for an encoder
    whose L layers the model mixes)."""
    if not features:
        return np.zeros((model.size, 0, 8), np.float32), np.zeros((model.size, 0, 3), np.float32)
    device = torch.device(device)
    encoders = list(model.encoder_dims)
    order = np.argsort([sum(len(f[n]) for n in encoders) for f in features], kind="stable")
    batches = (data.pad_features([features[k] for k in chunk], encoders, data.host_dtype(device))
               for chunk in data.chunks(order, batch_size))
    logits, attrs = run_model(model.to(device), batches, device)
    return tuple(_unsorted(order, torch.softmax(logits, dim=-1), attrs))


def fused_groups(models: dict[str, FusionNetwork]) -> list[tuple[list[str], FusionNetwork]]:
    """The models (lone networks by key) grouped by architecture (encoders, model config and the stored layers they
    read: `FusionNetwork.architecture`), each group stacked into one network (`FusionNetwork.stack`) that scores all
    its members from one read of the features."""
    groups: list[list[str]] = []
    for key, model in models.items():
        group = next((g for g in groups if models[g[0]].architecture == model.architecture), None)
        if group is None:
            groups.append([key])
        else:
            group.append(key)
    return [(keys, FusionNetwork.stack([models[k] for k in keys])) for keys in groups]


def prediction_table(ids: Sequence[str], probs: np.ndarray, attrs: np.ndarray, labels: LabelArrays | None = None,
                     id_column: str = "id", clip: bool = False) -> pd.DataFrame:
    """The one prediction table (evaluate, ensembles, predict, the timeline): one row per id, in the given order:
    `id_column`, EmoClass (predicted letter), prob_<class>, EmoAct/EmoVal/EmoDom (clipped to the attribute range 1..7
    with `clip`, as the challenge reports them), and with `labels` the true_* columns."""
    table = pd.DataFrame({id_column: list(ids), "EmoClass": [CLASSES[k] for k in probs.argmax(axis=1)]})
    for k, c in enumerate(CLASSES):
        table[f"prob_{c}"] = probs[:, k]
    values = np.clip(attrs, *ATTRIBUTE_RANGE) if clip else attrs
    for k, name in enumerate(ATTRIBUTES):
        table[ATTRIBUTE_COLUMNS[name]] = values[:, k]
    if labels is not None:
        table["true_EmoClass"] = [CLASSES[k] if k >= 0 else None for k in labels.classes]
        for k, name in enumerate(ATTRIBUTES):
            table[f"true_{ATTRIBUTE_COLUMNS[name]}"] = labels.attributes[:, k]
    return table


def coverage(store, split: str, scored: int) -> str:
    """What an evaluation of `split` scored, for the user: the count against the split's original utterances in
    the store, and the parts the store skipped as not committed (their utterances are in no count)."""
    table = store.utterances
    originals = int(((table["split"] == split) & table["augmentation"].isna()).sum())
    line = f"scored {scored} of the {originals} original utterances of {split} in the store"
    if scored < originals:
        line += f" ({originals - scored} lack features of the checkpoint's encoders)"
    skipped = store.skipped_parts
    return line + ("; skipped parts: " + "; ".join(f"{name} ({why})" for name, why in sorted(skipped.items()))
                   if skipped else "; no part skipped")


def evaluate(checkpoint: str | Path, store, split: str = "Development", device: str = "auto",
             storage_options: dict | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics of a checkpoint on `split` (original utterances, X dropped) and the per-utterance prediction table.
    The checkpoint and the store may be URLs; `storage_options` apply to both."""
    store = open_if_url(store, storage_options)
    torch_device = resolve_device(device)
    model, cfg, meta = load_checkpoint(checkpoint, torch_device, storage_options)
    check_store_matches(meta, store)
    ids = data.evaluation_ids(store, list(model.encoder_dims), split)
    if not ids:
        raise DataError(f"store {store.url}: split {split!r} has no utterances with features for "
                         f"{list(model.encoder_dims)}")
    (probs,), (attrs,) = predict(model, store, ids, cfg.train.eval_batch_size, torch_device)
    labels = data.label_arrays(store.utterances, ids)
    return summarize(probs, attrs, labels), prediction_table(ids, probs, attrs, labels)
