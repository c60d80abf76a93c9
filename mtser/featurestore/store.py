"""The feature store: Zarr v3 layout, part writers with atomic commit, and the read API (docs/store-format.md).

Layout (every node is standard Zarr v3; zarr-python reads all of it):

    zarr.json                              attributes.mtser = {schema_version, format, created_by}
    encoders/<name>/zarr.json              attributes.mtser_encoder = EncoderInfo (provenance)
    parts/<part>/zarr.json                 attributes.mtser_part = {committed, committed_at, encoders, ...}
    parts/<part>/utterances/<column>       the table rows this part adds (id, split, emo_class, ...)
    parts/<part>/failures/<column>         id, path, stage, reason
    parts/<part>/features/<enc>/ids        utterance ids with frames for <enc>, in frame order
    parts/<part>/features/<enc>/offsets    int64 (n+1): utterance i is frames[offsets[i]:offsets[i+1]]
    parts/<part>/features/<enc>/frames     (rows, dim), ONE shard written by ONE writer
    parts/<part>/features/<enc>/crc32      uint32 per utterance, zlib.crc32 of its stored bytes (+ its scales)
    parts/<part>/features/<enc>/scale      float32 per frame, int8 encoders only (value = int8 * scale)

A writer owns its part; the part's `committed` attribute is written last, in one metadata write, so readers see
a part whole or not at all. Imports numpy, pandas, zarr and fsspec only.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import re
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Iterator

import fsspec
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from mtser import __version__
from mtser.featurestore.arrays import fetch, read_arrays
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.shards import (
    ByteSource, FramesLayout, FramesReader, FsspecByteSource, LocalByteSource, ShardFormatError, raw_shard,
)

SCHEMA_VERSION: int = 1
FORMAT_NAME = "mtser-feature-store"
DTYPES = ("float16", "float32", "int8")
COMPRESSIONS = ("none", "zstd")
ZSTD_LEVEL = 3
CHUNK_TARGET_BYTES = 64 * 1024          # inner chunk size of frames arrays (the unit zarr-python reads)
STRING_COLUMNS = ("split", "emo_class", "speaker", "gender", "transcript", "transcript_source", "augmentation",
                  "source_id")
FLOAT_COLUMNS = ("arousal", "valence", "dominance", "duration")
TABLE_COLUMNS = ("split", "emo_class", "arousal", "valence", "dominance", "speaker", "gender", "duration",
                 "transcript", "transcript_source", "augmentation", "source_id")
FAILURE_COLUMNS = ("id", "path", "stage", "reason")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StoreError(Exception):
    """Anything wrong with a store, an utterance or an encoder; the message names the item and the reason."""


@dataclass(frozen=True)
class EncoderInfo:
    """Provenance of one encoder's features, stored once per encoder."""

    name: str
    kind: str                     # "speech" | "whisper" | "text"
    model: str                    # hub id or local directory
    revision: str | None
    content_hash: str | None      # hash of local weights (when no hub revision pins them)
    layer: int
    mean_last_k: int
    dim: int
    frame_rate: float             # frames per second of audio; 0.0 for text tokens
    dtype: str                    # "float16" | "float32" | "int8"
    compression: str              # "none" | "zstd"
    sample_rate: int
    mtser_version: str
    config: dict                  # mtser.config.to_dict(EncoderConfig) the features were extracted with

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "encoder") -> EncoderInfo:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise StoreError(f"{where}: provenance lacks {missing}")
        return cls(**{n: data[n] for n in names})

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise StoreError(f"encoder {self.name!r}: name must match {_NAME.pattern}")
        if self.dtype not in DTYPES:
            raise StoreError(f"encoder {self.name!r}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise StoreError(f"encoder {self.name!r}: compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.dim < 1:
            raise StoreError(f"encoder {self.name!r}: dim must be positive, got {self.dim}")


# --------------------------------------------------------------------------------------------------------- store access
def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)


def _zarr_store(url: str, storage_options: dict | None, read_only: bool) -> Any:
    if _is_local(url):
        return zarr.storage.LocalStore(_local_path(url), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)


def _byte_source(url: str, storage_options: dict | None) -> ByteSource:
    if _is_local(url):
        return LocalByteSource(_local_path(url))
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return FsspecByteSource(fs, root)


def _get_json(store: Any, key: str) -> dict | None:
    return sync(_aget_json(store, key))


async def _aget_json(store: Any, key: str) -> dict | None:
    buf = await store.get(key, prototype=default_buffer_prototype())
    return None if buf is None else json.loads(buf.to_bytes())


async def _alist_dir(store: Any, prefix: str) -> list[str]:
    names = [name async for name in store.list_dir(prefix)]
    return sorted(n for n in names if n != "zarr.json" and not n.endswith(".partial"))


def _root_attrs(store: Any, url: str) -> dict:
    """The root's mtser attributes; StoreError when `url` is not an mtser store or one too new to read."""
    try:
        meta = _get_json(store, "zarr.json")
    except (OSError, ValueError) as exc:
        raise StoreError(f"{url}: cannot read the store root: {exc}") from exc
    if meta is None:
        raise StoreError(f"{url}: not an mtser feature store (no zarr.json at its root)")
    attrs = meta.get("attributes", {}).get("mtser") if isinstance(meta, dict) else None
    if meta.get("zarr_format") != 3 or not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{url}: not an mtser feature store (zarr.json has no mtser attributes)")
    version = attrs.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise StoreError(f"{url}: store schema version {version!r} is newer than this mtser {__version__} reads "
                         f"(up to {SCHEMA_VERSION}); upgrade mtser")
    return attrs


def _read_encoders(store: Any) -> dict[str, EncoderInfo]:
    async def load() -> dict[str, EncoderInfo]:
        names = await _alist_dir(store, "encoders")
        metas = await asyncio.gather(*(_aget_json(store, f"encoders/{n}/zarr.json") for n in names),
                                     return_exceptions=True)
        found = {}
        for name, meta in zip(names, metas):
            try:
                if isinstance(meta, Exception):
                    raise meta
                if meta is not None:
                    found[name] = EncoderInfo.from_dict(meta["attributes"]["mtser_encoder"], f"encoder {name!r}")
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"encoder {name!r}: provenance unreadable ({type(exc).__name__}: {exc})") from exc
        return found
    return sync(load())


def create_store(url: str, storage_options: dict | None = None) -> None:
    """Create an empty store at `url` (local path or fsspec URL); a no-op when one exists already.

    Safe to call from many writers at once: nothing is ever overwritten, concurrent creators write the same bytes.
    """
    store = _zarr_store(url, storage_options, read_only=False)
    if _get_json(store, "zarr.json") is None:
        if set(sync(_alist_dir(store, ""))) - {"encoders", "parts"}:
            raise StoreError(f"{url}: exists and is not empty, but is not an mtser feature store")
        attrs = {"mtser": {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION,
                           "created_by": f"mtser {__version__}"}}
        _create_group_once(store, "", attrs)
    _root_attrs(store, url)
    for child in ("encoders", "parts"):
        _create_group_once(store, child, {})


def _create_group_once(store: Any, path: str, attributes: dict) -> None:
    """Create a group unless one exists (never `overwrite=True`: in zarr that deletes everything below)."""
    if _get_json(store, f"{path}/zarr.json" if path else "zarr.json") is not None:
        return
    try:
        zarr.create_group(store, path=path or None, attributes=attributes)
    except zarr.errors.ContainsGroupError:
        pass                                                  # another writer created it meanwhile


def register_encoder(url: str, info: EncoderInfo, storage_options: dict | None = None) -> None:
    """Record an encoder's provenance; a no-op if identical, StoreError if the name exists with other provenance."""
    info.validate()
    store = _zarr_store(url, storage_options, read_only=False)
    _root_attrs(store, url)
    existing = _get_json(store, f"encoders/{info.name}/zarr.json")
    if existing is None:
        _create_group_once(store, f"encoders/{info.name}", {"mtser_encoder": info.to_dict()})
        existing = _get_json(store, f"encoders/{info.name}/zarr.json")
    old = EncoderInfo.from_dict(existing["attributes"]["mtser_encoder"], f"encoder {info.name!r}")
    diff = [f for f in old.to_dict() if f != "mtser_version" and getattr(old, f) != getattr(info, f)]
    if diff:
        raise StoreError(f"{url}: encoder {info.name!r} is already registered with different provenance "
                         f"(fields {diff} differ); use another encoder name")


# --------------------------------------------------------------------------------------------------------------- writer
def _check_part_id(part_id: str) -> None:
    if not isinstance(part_id, str) or not _NAME.match(part_id):
        raise StoreError(f"part id {part_id!r}: must match {_NAME.pattern}")


def part_state(store: Any, part_id: str) -> dict | None:
    """The part's mtser attributes, or None when the part does not exist (or has no metadata yet)."""
    meta = _get_json(store, f"parts/{part_id}/zarr.json")
    return None if meta is None else meta.get("attributes", {}).get("mtser_part", {})


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


def _stored_checksum(frames: np.ndarray, scale: np.ndarray | None) -> int:
    crc = zlib.crc32(np.ascontiguousarray(frames).data)
    return crc if scale is None else zlib.crc32(np.ascontiguousarray(scale).data, crc)


class StoreWriter:
    """Writes one part (= one shard of work). Nothing is visible to readers until `commit()`.

    All rows are buffered in memory and written at commit: every array of the part is written by this writer alone
    (frames in one call, so each shard file is written once), then the part is marked committed in one metadata
    write. A part left uncommitted by a killed writer is deleted when a writer with the same part id commits.
    """

    def __init__(self, url: str, part_id: str, storage_options: dict | None = None):
        _check_part_id(part_id)
        self.url, self.part_id = url, part_id
        self._store = _zarr_store(url, storage_options, read_only=False)
        _root_attrs(self._store, url)
        state = part_state(self._store, part_id)
        if state and state.get("committed"):
            raise StoreError(f"{url}: part {part_id!r} is already committed; committed parts are immutable, "
                             f"write to a new part id")
        self._encoders = _read_encoders(self._store)
        self._rows: list[Utterance] = []
        self._ids: set[str] = set()
        self._features: dict[str, list[tuple[str, np.ndarray, np.ndarray | None]]] = {}
        self._failures: list[tuple[str, str, str, str]] = []
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
            self._encoders = _read_encoders(self._store)
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
        """Record an utterance that could not be processed (kept in the part's `failures` table)."""
        self._check_open()
        self._failures.append((str(utt_id), path or "", str(stage), str(reason)))

    def abort(self) -> None:
        """Drop everything buffered; nothing is written."""
        self._rows, self._ids, self._features, self._failures = [], set(), {}, []
        self._closed = True

    def commit(self) -> None:
        """Write all arrays of the part, then mark it committed (the one write that makes it visible)."""
        self._check_open()
        path = f"parts/{self.part_id}"
        state = part_state(self._store, self.part_id)
        if state and state.get("committed"):
            raise StoreError(f"{self.url}: part {self.part_id!r} was committed by another writer meanwhile")
        sync(self._store.delete_dir(path))        # leftovers of a killed writer of this part id
        group = zarr.create_group(self._store, path=path,
                                  attributes={"mtser_part": {"committed": False, "writer": _writer_id()}})
        _write_table(group, "utterances", {"id": [u.id for u in self._rows],
                                           **{c: [getattr(u, c) for u in self._rows] for c in TABLE_COLUMNS}})
        _write_table(group, "failures", dict(zip(FAILURE_COLUMNS, map(list, zip(*self._failures))))
                     if self._failures else {c: [] for c in FAILURE_COLUMNS})
        summary = {name: self._write_encoder(group, self._encoders[name], items)
                   for name, items in sorted(self._features.items())}
        now = time.time_ns()
        group.update_attributes({"mtser_part": {
            "committed": True, "committed_ns": now,
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9)),
            "writer": _writer_id(), "mtser_version": __version__, "n_utterances": len(self._rows),
            "n_failures": len(self._failures), "encoders": summary}})
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
        _write_small(group, f"{prefix}/ids", np.array([i for i, _, _ in items], dtype=str))
        _write_small(group, f"{prefix}/offsets", offsets)
        _write_small(group, f"{prefix}/crc32",
                     np.array([_stored_checksum(f, s) for _, f, s in items], dtype=np.uint32))
        if info.dtype == "int8":
            _write_small(group, f"{prefix}/scale", np.concatenate([s for _, _, s in items]))
        return {"n": len(items), "frames": rows, "dim": info.dim, "dtype": info.dtype,
                "nbytes": rows * info.dim * dtype.itemsize, "stored_bytes": int(sync(self._store.getsize(shard_key)))}


def _writer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _write_small(group: zarr.Group, name: str, values: np.ndarray) -> None:
    """A one-chunk index array, zstd-compressed and crc32c-checked (zarr verifies the checksum on every read)."""
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype if values.dtype.kind != "U" else str,
                             chunks=values.shape if values.size else (1,), compressors=[ZstdCodec(level=ZSTD_LEVEL),
                                                                                        Crc32cCodec()])
    if values.size:
        arr[...] = values


def _write_table(group: zarr.Group, name: str, columns: dict[str, list]) -> None:
    for col, values in columns.items():
        if col in FLOAT_COLUMNS:
            array = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        else:
            array = np.array(["" if v is None else str(v) for v in values], dtype=str)
        _write_small(group, f"{name}/{col}", array)


# --------------------------------------------------------------------------------------------------------------- reader
@dataclass
class _Segment:
    """One encoder's frames within one committed part."""

    part: str
    info: EncoderInfo
    ids: np.ndarray
    offsets: np.ndarray
    layout: FramesLayout | None
    reader: FramesReader | None = None
    scale: np.ndarray | None = None
    array: Any = None                     # zarr array, for the fallback path only

    @property
    def path(self) -> str:
        return f"parts/{self.part}/features/{self.info.name}"


@dataclass
class _Part:
    name: str
    attrs: dict                           # the part's mtser_part attributes (counts and sizes per encoder)
    segments: dict[str, _Segment]

    @property
    def committed_ns(self) -> int:
        return int(self.attrs["committed_ns"])

    @property
    def n_utterances(self) -> int:
        return int(self.attrs.get("n_utterances", 0))

    @property
    def n_failures(self) -> int:
        return int(self.attrs.get("n_failures", 0))


@dataclass
class _State:
    parts: dict[str, _Part]                                  # committed parts, oldest commit first
    index: dict[str, dict[str, tuple[_Segment, int]]]        # encoder -> id -> (segment, position)


class FeatureStore:
    """Read access to a store; open with `open_store`. Thread-safe; never writes."""

    def __init__(self, url: str, storage_options: dict | None = None, strict: bool = True):
        """`strict=False` (for verify) records unreadable parts in `broken_parts` instead of raising."""
        self.url = url
        self._strict = strict
        self.broken_parts: dict[str, str] = {}
        self.storage_options = storage_options
        self._store = _zarr_store(url, storage_options, read_only=True)
        if _is_local(url) and not os.path.isdir(_local_path(url)):
            raise StoreError(f"{url}: no such store (directory does not exist)")
        self.attrs = _root_attrs(self._store, url)
        self._source = _byte_source(url, storage_options)
        self._lock = threading.Lock()
        self._table: pd.DataFrame | None = None
        self._failures: pd.DataFrame | None = None
        self.encoders: dict[str, EncoderInfo] = {}
        self._state = _State({}, {})
        self.refresh()

    # ------------------------------------------------------------------------------------------------ loading
    def refresh(self) -> None:
        """Pick up encoders and parts committed since open (committed parts never change)."""
        with self._lock:
            self.encoders = _read_encoders(self._store)
            known = self._state.parts
            new = self._load_new_parts(set(known))
            if not new and self._table is not None:
                return
            parts = dict(sorted({**known, **new}.items(), key=lambda kv: (kv[1].committed_ns, kv[0])))
            index: dict[str, dict[str, tuple[_Segment, int]]] = {name: {} for name in self.encoders}
            for part in parts.values():                      # later commits overwrite earlier rows
                for name, seg in part.segments.items():
                    index.setdefault(name, {}).update(zip(seg.ids, zip(repeat(seg), range(len(seg.ids)))))
            self._state = _State(parts, index)
            self._table = self._failures = None

    def _load_new_parts(self, known: set[str]) -> dict[str, _Part]:
        names = [n for n in sync(_alist_dir(self._store, "parts")) if n not in known]
        committed = {}
        for name, raw in zip(names, fetch(self._store, [f"parts/{n}/zarr.json" for n in names])):
            try:
                attrs = json.loads(raw)["attributes"].get("mtser_part", {}) if raw is not None else {}
            except (ValueError, KeyError, AttributeError) as exc:
                self._part_failed(name, exc)
                continue
            if attrs.get("committed") is True:               # else: being written, or left by a killed writer
                committed[name] = attrs
        try:
            return self._load_parts(committed)
        except Exception:                                     # find the unreadable part(s), load the others
            loaded = {}
            for name, attrs in committed.items():
                try:
                    loaded.update(self._load_parts({name: attrs}))
                except Exception as exc:
                    self._part_failed(name, exc)
            return loaded

    def _part_failed(self, name: str, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if self._strict:
            raise StoreError(f"{self.url}: part {name!r} is unreadable ({reason}); run `mtser features verify`") from exc
        self.broken_parts[name] = reason

    def _load_parts(self, committed: dict[str, dict]) -> dict[str, _Part]:
        """Segments of the given committed parts: ids and offsets per encoder, read as one batch."""
        keys = [(part, enc) for part, attrs in committed.items() for enc in attrs.get("encoders", {})]
        unknown = [(p, e) for p, e in keys if e not in self.encoders]
        if unknown:
            raise StoreError(f"encoder {unknown[0][1]!r} has frames in part {unknown[0][0]!r} but is not registered")
        bases = [f"parts/{part}/features/{enc}" for part, enc in keys]
        arrays = read_arrays(self._store, [f"{b}/{a}" for b in bases for a in ("ids", "offsets")])
        metas = fetch(self._store, [f"{b}/frames/zarr.json" for b in bases])
        parts = {name: _Part(name, attrs, {}) for name, attrs in committed.items()}
        for k, ((part, enc), base, meta) in enumerate(zip(keys, bases, metas)):
            layout = FramesLayout.parse(f"{base}/frames", json.loads(meta)) if meta is not None else None
            parts[part].segments[enc] = _Segment(
                part, self.encoders[enc], np.asarray(arrays[2 * k], dtype=object), arrays[2 * k + 1].astype(np.int64),
                layout, FramesReader(self._source, layout) if layout else None)
        return parts

    # ------------------------------------------------------------------------------------------------ tables
    @property
    def utterances(self) -> pd.DataFrame:
        """The utterance table, index "id"; the row from the latest commit wins; None/NaN where unknown."""
        if self._table is None:
            table = self._read_tables(list(self._state.parts), "utterances", ("id",) + TABLE_COLUMNS)
            self._table = table.drop_duplicates("id", keep="last").set_index("id").sort_index()
        return self._table

    @property
    def failures(self) -> pd.DataFrame:
        """Utterances writers could not process: id, path, stage, reason, part."""
        if self._failures is None:
            parts = [p.name for p in self._state.parts.values() if p.n_failures]
            self._failures = self._read_tables(parts, "failures", FAILURE_COLUMNS)
        return self._failures

    def _read_tables(self, parts: list[str], table: str, columns: tuple[str, ...]) -> pd.DataFrame:
        """One table (utterances or failures) of several parts, rows in part order; failures also get "part"."""
        extra = ("part",) if table == "failures" else ()
        if not parts:
            return _empty_table(columns + extra)
        arrays = read_arrays(self._store, [f"parts/{p}/{table}/{c}" for p in parts for c in columns])
        by_column = [arrays[j::len(columns)] for j in range(len(columns))]
        data = {c: _table_column(c, np.concatenate(v)) for c, v in zip(columns, by_column)}
        if extra:
            data["part"] = np.repeat(np.array(parts, dtype=object), [len(a) for a in by_column[0]])
        return pd.DataFrame(data)

    # ------------------------------------------------------------------------------------------------ lookups
    def committed_parts(self) -> set[str]:
        return set(self._state.parts)

    def _encoder_index(self, encoder: str) -> dict[str, tuple[_Segment, int]]:
        index = self._state.index.get(encoder)
        if index is None:
            raise StoreError(f"{self.url}: no encoder {encoder!r} in the store (encoders: {sorted(self.encoders)})")
        return index

    def _locate(self, utt_id: str, encoder: str) -> tuple[_Segment, int]:
        hit = self._encoder_index(encoder).get(utt_id)
        if hit is None:
            if utt_id in self.utterances.index:
                raise StoreError(f"{self.url}: utterance {utt_id!r} has no features for encoder {encoder!r}")
            raise StoreError(f"{self.url}: no utterance {utt_id!r} in the store")
        return hit

    def ids(self, split: str | None = None, encoder: str | None = None) -> list[str]:
        """Sorted utterance ids, optionally only those of `split` and/or with features for `encoder`."""
        ids = set(self._encoder_index(encoder)) if encoder is not None else set(self.utterances.index)
        if split is not None:
            table = self.utterances
            ids &= set(table.index[table["split"] == split])
        return sorted(ids)

    def has(self, utt_id: str, encoder: str) -> bool:
        return utt_id in self._encoder_index(encoder)

    def length(self, utt_id: str, encoder: str) -> int:
        seg, i = self._locate(utt_id, encoder)
        return int(seg.offsets[i + 1] - seg.offsets[i])

    def summary(self) -> dict[str, Any]:
        """Counts and sizes for `mtser features ls`: per encoder utterances per split, frames, bytes on storage."""
        table, parts = self.utterances, self.parts()
        split_of = table["split"].astype(object).where(table["split"].notna(), "(none)")
        encoders = {}
        for name, index in sorted(self._state.index.items()):
            info = self.encoders[name]
            encoders[name] = {
                "kind": info.kind, "model": info.model, "dim": info.dim, "dtype": info.dtype,
                "compression": info.compression, "utterances": len(index),
                "per_split": {str(k): int(v) for k, v in split_of.reindex(list(index)).value_counts().items()},
                "frames": int(sum(int(seg.offsets[i + 1] - seg.offsets[i]) for seg, i in index.values())),
                "stored_bytes": int(sum(p.attrs["encoders"][name].get("stored_bytes", 0)
                                        for p in parts if name in p.segments))}
        return {"url": self.url, "schema_version": self.attrs["schema_version"], "parts": len(parts),
                "utterances": len(table), "per_split": {str(k): int(v) for k, v in split_of.value_counts().items()},
                "failures": len(self.failures), "encoders": encoders}

    # ------------------------------------------------------------------------------------------------ frames
    def get(self, utt_id: str, encoder: str, dtype: Any = None) -> np.ndarray:
        """(T, D) frames in the stored dtype (int8 encoders: dequantised float32), or cast to `dtype`."""
        return self.get_many([utt_id], encoder, dtype)[0]

    def get_many(self, utt_ids: list[str], encoder: str, dtype: Any = None) -> list[np.ndarray]:
        hits = [self._locate(u, encoder) for u in utt_ids]
        raws = self._read_raw(hits, utt_ids)
        return [self._decode(seg, i, raw, dtype) for (seg, i), raw in zip(hits, raws)]

    def _read_raw(self, hits: list[tuple[_Segment, int]], utt_ids: list[str]) -> list[np.ndarray]:
        """Stored frames of each (segment, position) as new arrays; remote sources fetch a batch concurrently."""
        try:
            if not self._source.batches or len(hits) == 1:
                return [self._rows(seg, int(seg.offsets[i]), int(seg.offsets[i + 1])) for seg, i in hits]
            requests, plans = [], []
            for seg, i in hits:
                start, stop = int(seg.offsets[i]), int(seg.offsets[i + 1])
                pieces = seg.reader.ranges(start, stop) if seg.reader is not None else None
                plans.append((seg, start, stop, pieces, len(requests)))
                requests += [(seg.layout.shard_key, a, b) for _, a, b, _ in pieces or []]
            blobs = self._source.read_many(requests)
            return [self._rows(seg, start, stop) if pieces is None
                    else seg.reader.assemble(start, stop, pieces, blobs[first:first + len(pieces)])
                    for seg, start, stop, pieces, first in plans]
        except (OSError, ShardFormatError, ValueError, RuntimeError) as exc:
            where = ", ".join(f"{u!r} ({seg.path})" for u, (seg, _) in list(zip(utt_ids, hits))[:3])
            raise StoreError(f"{self.url}: cannot read frames of {where}: {exc}") from exc

    def _rows(self, seg: _Segment, start: int, stop: int) -> np.ndarray:
        if seg.reader is not None:
            return seg.reader.read_rows(start, stop)
        if seg.array is None:                                  # not mtser's shard layout: plain zarr-python
            seg.array = zarr.open_array(self._store, path=f"{seg.path}/frames", mode="r")
        return np.asarray(seg.array[start:stop])

    # ------------------------------------------------------------------------------------------------ for verify
    def parts(self) -> list[_Part]:
        """Committed parts, oldest commit first."""
        return list(self._state.parts.values())

    def part_table(self, part: str, table: str = "utterances") -> pd.DataFrame:
        return self._read_tables([part], table, ("id",) + TABLE_COLUMNS if table == "utterances" else FAILURE_COLUMNS)

    def segment_array(self, seg: _Segment, name: str) -> np.ndarray:
        """One of the segment's small arrays ("crc32", "scale", ...), read and checksum-checked by zarr."""
        return read_arrays(self._store, [f"{seg.path}/{name}"])[0]

    def read_stored(self, seg: _Segment, positions: list[int]) -> list[np.ndarray]:
        """Frames exactly as stored (int8 encoders: the int8 values) of the segment's utterances at `positions`."""
        return self._read_raw([(seg, i) for i in positions], [str(seg.ids[i]) for i in positions])

    def shard_padding(self, seg: _Segment) -> np.ndarray | None:
        """The bytes between the last frame and the shard index (all zero when intact); None if not applicable."""
        return seg.reader.padding() if seg.reader is not None else None

    def segment_scales(self, seg: _Segment, i: int) -> np.ndarray | None:
        """Per-frame int8 scales of the utterance at position `i`; None for float encoders."""
        if seg.info.dtype != "int8":
            return None
        if seg.scale is None:
            seg.scale = self.segment_array(seg, "scale")
        return seg.scale[seg.offsets[i]:seg.offsets[i + 1]]

    def _decode(self, seg: _Segment, i: int, raw: np.ndarray, dtype: Any) -> np.ndarray:
        if seg.info.dtype == "int8":
            values = np.multiply(raw, self.segment_scales(seg, i)[:, None], dtype=np.float32)
            return values if dtype is None else values.astype(dtype, copy=False)
        return raw if dtype is None else raw.astype(dtype)

    def iter_split(self, split: str, encoders: list[str], batch: int = 64) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """(id, {encoder: frames}) for every utterance of `split` that has all `encoders`, sorted by id."""
        ids = set(self.ids(split))
        for enc in encoders:
            ids &= set(self._encoder_index(enc))
        ordered = sorted(ids)
        for lo in range(0, len(ordered), batch):
            chunk = ordered[lo:lo + batch]
            frames = {enc: self.get_many(chunk, enc) for enc in encoders}
            for k, utt in enumerate(chunk):
                yield utt, {enc: frames[enc][k] for enc in encoders}

    def close(self) -> None:
        self._source.close()

    def __reduce__(self) -> tuple:
        """Pickles as its URL (e.g. into Ray tasks): the copy reopens the store and reads the current index."""
        return FeatureStore, (self.url, self.storage_options, self._strict)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _table_column(name: str, values: np.ndarray) -> np.ndarray:
    if name in FLOAT_COLUMNS:
        return values.astype(np.float64)
    values = values.astype(object)
    values[values == ""] = None                    # strings are stored with "" for unknown
    return values


def _empty_table(columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=np.float64 if c in FLOAT_COLUMNS else object) for c in columns})


def open_store(url: str, mode: str = "r", storage_options: dict | None = None) -> FeatureStore:
    """Open a store for reading. mode "r": the store must exist (opening never writes); "a": create it if missing."""
    if mode not in ("r", "a"):
        raise StoreError(f"{url}: mode must be 'r' or 'a', got {mode!r}")
    if mode == "a":
        create_store(url, storage_options)
    return FeatureStore(url, storage_options)
