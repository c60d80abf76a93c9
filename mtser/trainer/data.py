"""Store → batches: label filtering per task, epoch sampling, padding with masks (prefetched in the background by
`featurestore.prefetch`).

Training draws `samples_per_epoch` utterances of the Train split (augmented copies included); evaluation walks a
whole split in length-sorted batches over original utterances only.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

from mtser.errors import DataError
from mtser.featurestore.labels import ATTRIBUTES, CLASS_INDEX, CLASSES
from mtser.featurestore.store import StoreError, open_store
from mtser.trainer.losses import Task
from mtser.trainer.metrics import LabelArrays

T = TypeVar("T")
log = logging.getLogger(__name__)


def open_if_url(store, storage_options: dict | None = None):
    """An open FeatureStore as given, or one opened read-only from its URL."""
    if not isinstance(store, (str, Path)):
        return store
    return open_store(str(store), storage_options=storage_options)


# ------------------------------------------------------------------------------------------------------ selection
def label_arrays(table: pd.DataFrame, ids: Sequence[str]) -> LabelArrays:
    """Class indices (-1 unless one of the 8 classes) and attributes (NaN when unknown) of `ids`."""
    rows = table.loc[list(ids)]
    classes = rows["emo_class"].map(lambda c: CLASS_INDEX.get(c, -1) if isinstance(c, str) else -1)
    attributes = rows[list(ATTRIBUTES)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
    is_x = (rows["emo_class"] == "X").to_numpy()
    return LabelArrays(classes.to_numpy(dtype=np.int64, copy=True), attributes.copy(), is_x if is_x.any() else None)


def with_features(store, split: str, encoders: Sequence[str]) -> list[str]:
    """Ids of `split` that have features for every encoder, in the store's order."""
    first = store.ids(split=split, encoder=encoders[0])
    common = set(first).intersection(*(store.ids(split=split, encoder=name) for name in encoders[1:]))
    return [i for i in first if i in common]


def training_ids(store, encoders: Sequence[str], task: Task, split: str = "Train", *, augmented: bool = True,
                 exclude: Collection[str] = ()) -> list[str]:
    """Utterances a task trains on: X never; O only for attributes (multi, dim); cat needs one of the 8 classes, dim
    all three attributes, multi either. `augmented`: include the store's augmented copies; `exclude`: original ids
    held out (their augmented copies go with them)."""
    ids = with_features(store, split, encoders)
    rows = store.utterances.loc[ids]
    labels = label_arrays(store.utterances, ids)
    has_class = labels.classes >= 0
    has_attributes = np.isfinite(labels.attributes).all(axis=1)
    is_x = (rows["emo_class"] == "X").to_numpy()
    keep = {"cat": has_class, "dim": has_attributes & ~is_x, "multi": (has_class | has_attributes) & ~is_x}[task]
    copy = rows["augmentation"].notna().to_numpy()
    if not augmented:
        keep &= ~copy
    if exclude:
        held_out = set(exclude)
        origin = np.where(copy, rows["source_id"].to_numpy(dtype=object), np.asarray(ids, dtype=object))
        keep &= ~np.isin(origin, list(held_out))
    return [i for i, k in zip(ids, keep) if k]


def evaluation_ids(store, encoders: Sequence[str], split: str) -> list[str]:
    """Original (non-augmented) utterances of `split` with features; X rows and unlabelled rows are kept (metrics
    leave out what they cannot score; the challenge's CCC counts X rows)."""
    ids = with_features(store, split, encoders)
    keep = store.utterances.loc[ids, "augmentation"].isna().to_numpy()
    return [i for i, k in zip(ids, keep) if k]


def selection_split(store, encoders: Sequence[str], fraction: float, seed: int, split: str = "Train") -> list[str]:
    """Original utterances of `split` held out to select on (the paper's ablation: 10 % of Train), by speaker.

    Speakers (utterances with an unknown speaker: each alone) are shuffled with `seed` and taken whole until they
    hold `fraction` of the utterances: no speaker is on both sides, and the same store and seed give the same split."""
    ids = evaluation_ids(store, encoders, split)
    speakers = store.utterances.loc[ids, "speaker"]
    known = speakers.notna() & ~speakers.astype(str).str.lower().isin(["", "unknown", "none", "nan"])
    groups = pd.Series(np.where(known, "speaker:" + speakers.astype(str), "utterance:" + pd.Index(ids)), index=ids)
    names = sorted(groups.unique())
    order = np.random.default_rng(seed).permutation(len(names))
    sizes = groups.value_counts()
    chosen: set[str] = set()
    held = 0
    for k in order:
        if held >= fraction * len(ids):
            break
        chosen.add(names[k])
        held += int(sizes[names[k]])
    if len(chosen) == len(names):
        raise DataError(f"store {store.url}: {split} has {len(names)} speaker group(s); holding out {fraction:g} of "
                         "it would leave nothing to train on")
    return [i for i in ids if groups[i] in chosen]


def class_counts(labels: LabelArrays) -> np.ndarray:
    """Frequency of each of the 8 classes."""
    return np.bincount(labels.classes[labels.classes >= 0], minlength=len(CLASSES))


def epoch_sample(pool: Sequence[str], n: int, seed: int, epoch: int) -> list[str]:
    """`n` ids drawn for one epoch, seeded by (seed, epoch); with replacement only when the pool is smaller."""
    rng = np.random.default_rng([seed, epoch])
    picks = rng.choice(len(pool), size=n, replace=n > len(pool))
    return [pool[i] for i in picks]


def epoch_batches(pool: Sequence[str], lengths: dict[str, int], n: int, batch_size: int, seed: int, epoch: int,
                  buckets: int = 1) -> list[list[str]]:
    """One epoch's training batches: `epoch_sample`, then each window of `buckets` batches sorted by length and cut
    into batches (far less padding), and the batches shuffled. buckets=1: plain random batches."""
    ids = epoch_sample(pool, n, seed, epoch)
    if buckets <= 1:
        return [list(b) for b in chunks(ids, batch_size)]
    batches: list[list[str]] = []
    for window in chunks(ids, batch_size * buckets):
        batches.extend(list(b) for b in chunks(sorted(window, key=lengths.__getitem__), batch_size))
    order = np.random.default_rng([seed, epoch, buckets]).permutation(len(batches))
    return [batches[k] for k in order]


def total_lengths(store, ids: Sequence[str], encoders: Sequence[str]) -> dict[str, int]:
    """Frames (or tokens) of each id summed over encoders: the cost measure for length sorting."""
    return {i: sum(store.length(i, name) for name in encoders) for i in ids}


def length_sorted(store, ids: Sequence[str], encoders: Sequence[str]) -> list[str]:
    """Ids ordered by total frame count (evaluation batches then pad little)."""
    lengths = total_lengths(store, ids, encoders)
    return sorted(ids, key=lengths.__getitem__)


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[k : k + size] for k in range(0, len(items), size)]


# ------------------------------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    ids: list[str]
    features: dict[str, tuple[torch.Tensor, torch.Tensor]]  # encoder -> (x (B, T, D), mask (B, T) bool)
    classes: torch.Tensor                                    # (B,) int64, -1 = no class target
    attributes: torch.Tensor                                 # (B, 3) float32, NaN = unknown

    def to(self, device: torch.device | str) -> Batch:
        """On `device`, features as float32 (converted there: a float16 batch crosses to a GPU at half size; from
        pinned host memory the copies are asynchronous)."""
        return Batch(self.ids, features_to(self.features, device), self.classes.to(device, non_blocking=True),
                     self.attributes.to(device, non_blocking=True))


def features_to(features: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device | str
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Features on `device` as float32 (B, T, D) with masks; packed (N, D) frames are padded there."""
    out = {}
    for name, (x, mask) in features.items():
        x, mask = x.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        if x.dim() == 2:                        # the utterances' frames back to back, in the mask's row order
            padded = torch.zeros((*mask.shape, x.shape[-1]), dtype=torch.float32, device=x.device)
            padded[mask] = x.float()
            x = padded
        out[name] = (x.float(), mask)
    return out


def host_dtype(device: torch.device) -> type | None:
    """Padded batches stay in the stored dtype for a GPU, and become float32 in the loader threads for the CPU."""
    return None if device.type == "cuda" else np.float32


def pad(arrays: Sequence[np.ndarray], dtype: np.dtype | type | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_i, ...) arrays ((T_i, D), or (T_i, L, D) of L layers) → zero-padded (B, T_max, ...) and mask (B, T_max),
    True on real frames (in-memory features; store batches are read straight into their padded buffer by
    `BatchReader`). dtype None keeps the arrays'."""
    longest = max(1, max(len(a) for a in arrays))
    x = np.empty((len(arrays), longest, *arrays[0].shape[1:]), dtype=dtype or arrays[0].dtype)
    mask = np.zeros((len(arrays), longest), dtype=bool)
    for row, a in enumerate(arrays):
        x[row, : len(a)] = a
        x[row, len(a) :] = 0
        mask[row, : len(a)] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def pad_features(per_utterance: Sequence[dict[str, np.ndarray]], encoders: Sequence[str],
                 dtype: np.dtype | type | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: pad([f[name] for f in per_utterance], dtype) for name in encoders}


READ_DTYPE = {"float16": torch.float16, "float32": torch.float32, "int8": torch.float32}  # int8: dequantised
TORCH_TO_NUMPY = {torch.float16: np.float16, torch.float32: np.float32}
NUMPY_TO_TORCH = {np.dtype(n): t for t, n in TORCH_TO_NUMPY.items()}


class BufferPool:
    """Reused host buffers for padded batches. A buffer goes back to the pool only when the last tensor using it
    is freed (a finalizer on the numpy view that `torch.from_numpy` keeps alive, also through views and tensors
    autograd saved), so a buffer in use is never overwritten.

    A padded batch is tens of MB per encoder; glibc serves each fresh block of that size with a new mmap, so a fresh
    buffer per batch would pay a page fault per 4 KiB (docs/benchmarks.md, Loader). At most `keep` free buffers per
    dtype are kept.

    New buffers come from torch's allocator, not numpy's: numpy advises the kernel to back large arrays with huge
    pages (MADV_HUGEPAGE), which can make the first write into a fresh buffer, and so the first epoch and the first
    evaluation of every training process, many times slower (docs/benchmarks.md, Search: the huge-page item).
    """

    def __init__(self, keep: int = 64):
        self.keep = keep
        self._free: dict[np.dtype, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dtype, size = np.dtype(dtype), math.prod(shape)
        with self._lock:
            free = self._free.setdefault(dtype, [])
            fits = [k for k, b in enumerate(free) if b.size >= size]
            base = free.pop(min(fits, key=lambda k: free[k].size)) if fits else None
        if base is None:
            base = torch.empty(size + size // 4, dtype=NUMPY_TO_TORCH[dtype]).numpy()  # room for a longer batch
        view = base[:size].reshape(shape)
        weakref.finalize(view, self._give_back, base)
        return view

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault(base.dtype, [])
            if len(free) < self.keep:
                free.append(base)


class BatchReader:
    """Reads the batch of a list of ids: each utterance's frames straight into its row of the padded (B, T, D)
    buffer, masks, and labels indexed from arrays built once from the store's table. For a GPU (`packed`,
    `pin_memory`): the frames back to back in one (N, D) pinned buffer instead, padded on the device by
    `Batch.to` — a third fewer bytes to write on the host and to transfer, and no zero filling there.

    dtype: host dtype of the features (None: as read; float32 where the model runs on the CPU, converted once per
    batch in the prefetch threads, not in the training step). skip_unreadable (training): an utterance the store
    cannot read is left out of its batch, logged once and kept in `skipped` (id -> reason) instead of ending the
    run; evaluation keeps the default and fails loudly. layers: per encoder, the hidden-state indices to read
    (`FeatureStore.get`'s `layers`); an encoder stored with several layers, or read with `layers`, gives padded
    (B, T, L, D) features (never packed), except the encoders in `squeeze`, read with one layer: (B, T, D) as
    an encoder stored with one state (packed where asked).
    """

    def __init__(self, store, encoders: Sequence[str], dtype: np.dtype | type | None = None,
                 skip_unreadable: bool = False, pin_memory: bool = False, packed: bool = False,
                 layers: dict[str, list[int]] | None = None, squeeze: Collection[str] = ()):
        self.store = store
        self.packed = packed
        self.layers = dict(layers or {})
        self.squeeze = set(squeeze)
        wide = [n for n in self.squeeze if len(self.layers.get(n) or ()) != 1]
        if wide:
            raise ValueError(f"BatchReader: squeeze {wide}: only an encoder read with one layer can be squeezed")
        self.encoders = list(encoders)
        self.dtype = None if dtype is None else torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        self.skip_unreadable = skip_unreadable
        self.pin_memory = pin_memory
        self.skipped: dict[str, str] = {}
        self._buffers = BufferPool()
        table = store.utterances
        labels = label_arrays(table, table.index)
        self._row = {utt_id: k for k, utt_id in enumerate(table.index)}
        self._classes, self._attributes = labels.classes, labels.attributes

    def __call__(self, ids: Sequence[str]) -> Batch:
        if not self.skip_unreadable:
            return self._read(ids)
        ids = [i for i in ids if i not in self.skipped]
        try:
            return self._read(ids)
        except StoreError:
            readable = [i for i in ids if self._readable(i)]
            if not readable:
                raise StoreError(f"{self.store.url}: none of the {len(ids)} utterances of a batch is readable, "
                                 f"e.g. {ids[0]!r}: {self.skipped.get(ids[0])}") from None
            return self._read(readable)

    def _read(self, ids: Sequence[str]) -> Batch:
        ids = list(ids)
        rows = np.fromiter((self._row[i] for i in ids), dtype=np.int64, count=len(ids))
        features = {name: self._features(ids, name) for name in self.encoders}
        return Batch(ids, features, torch.from_numpy(self._classes[rows]), torch.from_numpy(self._attributes[rows]))

    def _features(self, ids: list[str], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = np.fromiter((self.store.length(i, name) for i in ids), dtype=np.int64, count=len(ids))
        info, layers = self.store.encoders[name], self.layers.get(name)
        mask = torch.from_numpy(np.arange(max(1, int(lengths.max())))[None, :] < lengths[:, None])
        frame = (info.dim,) if layers is None and info.layers is None else (len(layers or info.layers), info.dim)
        flat = len(frame) == 1 or name in self.squeeze
        shape = (int(lengths.sum()), *frame) if self.packed and flat else (*mask.shape, *frame)
        if self.pin_memory:                     # torch's caching host allocator reuses pinned blocks itself
            buffer = torch.empty(shape, dtype=READ_DTYPE[info.dtype], pin_memory=True)
        else:
            buffer = torch.from_numpy(self._buffers.take(shape, TORCH_TO_NUMPY[READ_DTYPE[info.dtype]]))
        self.store.read_into(ids, name, buffer.numpy(), layers)
        if self.dtype is not None and buffer.dtype != self.dtype:
            buffer = torch.from_numpy(self._buffers.take(shape, TORCH_TO_NUMPY[self.dtype])).copy_(buffer)
        return (buffer.squeeze(-2) if name in self.squeeze else buffer), mask

    def _readable(self, utt_id: str) -> bool:
        try:
            for name in self.encoders:
                self.store.get(utt_id, name, layers=self.layers.get(name))
        except StoreError as exc:
            self.skipped[utt_id] = str(exc)
            log.warning("skipping unreadable utterance %s: %s", utt_id, exc)
            return False
        return True


class WaitClock:
    """Wraps an iterator and adds up the time spent waiting in next() (the model waiting for data)."""

    def __init__(self, iterator: Iterator[T]):
        self._iterator = iterator
        self.waited = 0.0

    def __iter__(self) -> Iterator[T]:
        while True:
            start = time.perf_counter()
            try:
                item = next(self._iterator)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - start
            yield item
