"""StoreWriter: one writer's part of the store, buffered in memory and made visible by one atomic commit."""
from __future__ import annotations

import math
import os
import socket
import time
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from mtser import __version__
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.layout import (
    CHUNK_TARGET_BYTES, FAILURE_COLUMNS, FLOAT_COLUMNS, NAME_PATTERN, SCHEMA_VERSION, TABLE_COLUMNS, ZSTD_LEVEL,
    EncoderInfo, StoreError, part_state, read_encoders, root_attrs, upgrade_root, zarr_store,
)
from mtser.featurestore.arrays import encode_strings, string_arrays
from mtser.featurestore.segment import frames_checksum
from mtser.featurestore.shards import raw_shard


def _check_part_id(part_id: str) -> None:
    if not isinstance(part_id, str) or not NAME_PATTERN.match(part_id):
        raise StoreError(f"part id {part_id!r}: must match {NAME_PATTERN.pattern}")


def quantize_int8(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-frame int8: returns (int8 values, float32 scale per frame); value ≈ int8 * scale."""
    x = np.asarray(frames, dtype=np.float32)
    scale = (np.abs(x).max(axis=1) / 127.0).astype(np.float32)
    q = np.rint(x / np.where(scale > 0, scale, 1.0)[:, None])
    return np.clip(q, -127, 127).astype(np.int8), scale


def _check_row(utt: Utterance) -> None:
    """Table values must be None, numbers (float columns) or strings (the others)."""
    for col in TABLE_COLUMNS:
        value = getattr(utt, col)
        ok = (value is None or (isinstance(value, (int, float, np.number)) and not isinstance(value, bool))
              if col in FLOAT_COLUMNS else value is None or isinstance(value, str))
        if not ok:
            kind = "a number" if col in FLOAT_COLUMNS else "a string"
            raise StoreError(f"utterance {utt.id!r}: {col} must be {kind} or None, got {value!r}")


class StoreWriter:
    """Writes one part (= one shard of work). Nothing is visible to readers until `commit()`.

    All rows are buffered in memory and written at commit: every array of the part is written by this writer alone
    (frames in one call, so each shard file is written once), then the part is marked committed in one metadata
    write. A part left uncommitted by a killed writer is deleted when a writer with the same part id commits.
    """

    def __init__(self, url: str, part_id: str, storage_options: dict | None = None):
        _check_part_id(part_id)
        self.url, self.part_id = url, part_id
        self._store = zarr_store(url, storage_options, read_only=False)
        root_attrs(self._store, url)
        state = part_state(self._store, part_id)
        if state and state.get("committed"):
            raise StoreError(f"{url}: part {part_id!r} is already committed; committed parts are immutable, "
                             f"write to a new part id")
        self._encoders = read_encoders(self._store)
        self._rows: list[Utterance] = []
        self._ids: set[str] = set()
        self._features: dict[str, list[tuple[str, np.ndarray, np.ndarray | None]]] = {}
        self._failures: list[tuple[str, str, str, str]] = []
        self._warnings: list[tuple[str, str, str, str]] = []
        self._closed = False

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._closed:
            self.abort()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"part {self.part_id!r}: writer already committed or aborted")

    def _convert(self, utt_id: str, name: str, frames: Any) -> tuple[np.ndarray, np.ndarray | None]:
        if name not in self._encoders:                        # registered after this writer started?
            self._encoders = read_encoders(self._store)
        info = self._encoders.get(name)
        if info is None:
            raise StoreError(f"utterance {utt_id!r}: encoder {name!r} is not registered in {self.url} "
                             f"(registered: {sorted(self._encoders)})")
        x = np.asarray(frames)
        if x.ndim != 2 or x.shape[1] != info.dim or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.floating):
            raise StoreError(f"utterance {utt_id!r}, encoder {name!r}: expected a non-empty float (T, {info.dim}) "
                             f"array, got {x.dtype} {x.shape}")
        if info.dtype == "int8":
            if not np.isfinite(x).all():
                raise StoreError(f"utterance {utt_id!r}, encoder {name!r}: features contain NaN or inf")
            return quantize_int8(x)
        with np.errstate(over="ignore"):            # overflow shows up as inf, reported just below
            stored = np.array(x, dtype=info.dtype, order="C")   # a copy: callers may reuse their buffers
        if not np.isfinite(stored).all():
            raise StoreError(f"utterance {utt_id!r}, encoder {name!r}: features contain NaN or inf "
                             f"(as {info.dtype})")
        return stored, None

    def add(self, utt: Utterance, features: dict[str, np.ndarray]) -> None:
        """Buffer one utterance's table row and its (T, D) features per encoder; StoreError leaves nothing added."""
        self._check_open()
        if not isinstance(utt.id, str) or not utt.id:
            raise StoreError(f"utterance id {utt.id!r}: must be a non-empty string")
        if utt.id in self._ids:
            raise StoreError(f"utterance {utt.id!r}: added twice to part {self.part_id!r}")
        _check_row(utt)
        converted = {name: self._convert(utt.id, name, frames) for name, frames in features.items()}
        self._rows.append(utt)
        self._ids.add(utt.id)
        for name, (stored, scale) in converted.items():
            self._features.setdefault(name, []).append((utt.id, stored, scale))

    def add_failure(self, utt_id: str, path: str | None, stage: str, reason: str) -> None:
        """Record an utterance that could not be processed: nothing of it is written (the part's `failures`)."""
        self._check_open()
        self._failures.append((str(utt_id), path or "", str(stage), str(reason)))

    def add_warning(self, utt_id: str, path: str | None, stage: str, reason: str) -> None:
        """Record something worth knowing about an utterance that is kept and written (the part's `warnings`)."""
        self._check_open()
        self._warnings.append((str(utt_id), path or "", str(stage), str(reason)))

    def abort(self) -> None:
        """Drop everything buffered; nothing is written."""
        self._rows, self._ids, self._features, self._failures, self._warnings = [], set(), {}, [], []
        self._closed = True

    def commit(self) -> None:
        """Write all arrays of the part, then mark it committed (the one write that makes it visible)."""
        self._check_open()
        path = f"parts/{self.part_id}"
        state = part_state(self._store, self.part_id)
        if state and state.get("committed"):
            raise StoreError(f"{self.url}: part {self.part_id!r} was committed by another writer meanwhile")
        upgrade_root(self._store, self.url)
        sync(self._store.delete_dir(path))        # leftovers of a killed writer of this part id
        group = zarr.create_group(self._store, path=path,
                                  attributes={"mtser_part": {"committed": False, "writer": _writer_id()}})
        _write_table(group, "utterances", {"id": [u.id for u in self._rows],
                                           **{c: [getattr(u, c) for u in self._rows] for c in TABLE_COLUMNS}})
        for table, rows in (("failures", self._failures), ("warnings", self._warnings)):
            _write_table(group, table, {c: [r[j] for r in rows] for j, c in enumerate(FAILURE_COLUMNS)})
        summary = {name: self._write_encoder(group, self._encoders[name], items)
                   for name, items in sorted(self._features.items())}
        now = time.time_ns()
        group.update_attributes({"mtser_part": {
            "committed": True, "committed_ns": now, "schema_version": SCHEMA_VERSION,
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9)),
            "writer": _writer_id(), "mtser_version": __version__, "n_utterances": len(self._rows),
            "n_failures": len(self._failures), "n_warnings": len(self._warnings), "encoders": summary}})
        self._closed = True

    def _write_encoder(self, group: zarr.Group, info: EncoderInfo, items: list) -> dict[str, Any]:
        prefix = f"features/{info.name}"
        frames = [f for _, f, _ in items]
        offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames])]).astype(np.int64)
        rows, dtype = int(offsets[-1]), frames[0].dtype
        chunk_rows = max(1, min(rows, CHUNK_TARGET_BYTES // (info.dim * dtype.itemsize)))
        arr = group.create_array(
            f"{prefix}/frames", shape=(rows, info.dim), dtype=dtype, chunks=(chunk_rows, info.dim),
            shards=(math.ceil(rows / chunk_rows) * chunk_rows, info.dim), fill_value=0,
            compressors=ZstdCodec(level=ZSTD_LEVEL) if info.compression == "zstd" else None,
            config={"write_empty_chunks": True})
        shard_key = f"{group.path}/{prefix}/frames/c/0/0"
        if info.compression == "zstd":
            arr[...] = np.concatenate(frames)
        else:           # the bytes zarr-python would write, in one pass instead of one codec call per chunk
            shard = raw_shard(frames, chunk_rows)
            sync(self._store.set(shard_key, default_buffer_prototype().buffer.from_array_like(shard)))
        _write_strings(group, f"{prefix}/ids", [i for i, _, _ in items])
        _write_small(group, f"{prefix}/offsets", offsets)
        _write_small(group, f"{prefix}/crc32",
                     np.array([frames_checksum(f, s) for _, f, s in items], dtype=np.uint32))
        if info.dtype == "int8":
            _write_small(group, f"{prefix}/scale", np.concatenate([s for _, _, s in items]))
        return {"n": len(items), "frames": rows, "dim": info.dim, "dtype": info.dtype,
                "nbytes": rows * info.dim * dtype.itemsize, "stored_bytes": int(sync(self._store.getsize(shard_key)))}


def _writer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _write_small(group: zarr.Group, name: str, values: np.ndarray) -> None:
    """A one-chunk numeric index array, zstd-compressed and crc32c-checked (zarr verifies the checksum on every
    read)."""
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape if values.size else (1,),
                             compressors=[ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()])
    if values.size:
        arr[...] = values


def _write_strings(group: zarr.Group, name: str, values: list[str]) -> None:
    """A string column in core types: `<name>/utf8` (uint8) and `<name>/offsets` (int64, n+1)."""
    for path, array in zip(string_arrays(name), encode_strings(values)):
        _write_small(group, path, array)


def _write_table(group: zarr.Group, name: str, columns: dict[str, list]) -> None:
    for col, values in columns.items():
        if col in FLOAT_COLUMNS:
            array = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
            _write_small(group, f"{name}/{col}", array)
        else:
            _write_strings(group, f"{name}/{col}", ["" if v is None else str(v) for v in values])
