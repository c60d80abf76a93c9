"""StoreWriter: one writer's part of the store, streamed to its shard files and made visible by one atomic commit."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from mtser import __version__
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.layout import (
    CHUNK_TARGET_BYTES, FAILURE_COLUMNS, FLOAT_COLUMNS, NAME_PATTERN, SCHEMA_VERSION, TABLE_COLUMNS, ZSTD_LEVEL,
    EncoderInfo, StoreError, is_local, local_path, part_state, read_encoders, root_attrs, upgrade_root, upload,
    zarr_store,
)
from mtser.featurestore.arrays import encode_strings, string_arrays
from mtser.featurestore.claims import LEASE_SECONDS, Claim
from mtser.featurestore.frames import StoredFrames, store_frames
from mtser.featurestore.segment import frames_checksum
from mtser.featurestore.shards import ShardSpool


class PartCommitted(StoreError):
    """The part is committed already (committed parts are immutable)."""


def _check_part_id(part_id: str) -> None:
    if not isinstance(part_id, str) or not NAME_PATTERN.match(part_id):
        raise StoreError(f"part id {part_id!r}: must match {NAME_PATTERN.pattern}")


def _check_row(utt: Utterance) -> None:
    """Table values must be None, numbers (float columns) or strings (the others)."""
    for col in TABLE_COLUMNS:
        value = getattr(utt, col)
        ok = (value is None or (isinstance(value, (int, float, np.number)) and not isinstance(value, bool))
              if col in FLOAT_COLUMNS else value is None or isinstance(value, str))
        if not ok:
            kind = "a number" if col in FLOAT_COLUMNS else "a string"
            raise StoreError(f"utterance {utt.id!r}: {col} must be {kind} or None, got {value!r}")


@dataclass
class _EncoderStream:
    """One encoder's frames of the part: streamed to its shard file; only the small index arrays stay in memory."""

    spool: ShardSpool
    key: str                                             # store key of the shard file
    ids: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    checksums: list[int] = field(default_factory=list)
    scales: list[np.ndarray] = field(default_factory=list)


class StoreWriter:
    """Writes one part (= one shard of work). Nothing is visible to readers until `commit()`.

    Frames stream to the part's shard file (one per encoder) as utterances are added, so memory stays bounded by
    one utterance, not the part; the table, ids and offsets are kept until commit. Local stores get the shard file
    in place inside the (uncommitted, hence invisible) part; remote stores get a local spool file uploaded at
    commit. Commit writes the small arrays, then marks the part committed in one metadata write. A writer first
    claims its part id (`claims.Claim`: one live writer per part, on any number of processes or machines), so the
    leftovers of a killed writer it deletes before its first write are never another live writer's files.
    """

    def __init__(self, url: str, part_id: str, storage_options: dict | None = None, replaces: int | None = None,
                 lease_s: float = LEASE_SECONDS):
        """Claims the part (PartClaimed when another live writer holds it). `replaces`: the `committed_ns` of a
        committed part of this id found damaged, which this writer may redo (any other commit is refused)."""
        _check_part_id(part_id)
        self.url, self.part_id, self.storage_options = url, part_id, storage_options
        self._store = zarr_store(url, storage_options, read_only=False)
        root_attrs(self._store, url)
        self._check_uncommitted(replaces)                     # cheap refusal before claiming
        self._encoders = read_encoders(self._store)
        self._rows: list[Utterance] = []
        self._ids: set[str] = set()
        self._streams: dict[str, _EncoderStream] = {}
        self._spool_dir: str | None = None                    # remote stores: where shard files are spooled
        self._started = False
        self._failures: list[tuple[str, str, str, str]] = []
        self._warnings: list[tuple[str, str, str, str]] = []
        self._closed = False
        self._claim = Claim(url, storage_options, part_id, lease_s)
        self._claim.acquire()
        try:
            self._check_uncommitted(replaces)                 # committed by the previous holder meanwhile?
        except BaseException:
            self._claim.release()
            raise

    def _check_uncommitted(self, replaces: int | None) -> None:
        state = self._state()
        if state.get("committed") and (replaces is None or state.get("committed_ns") != replaces):
            raise PartCommitted(f"{self.url}: part {self.part_id!r} is already committed; committed parts are "
                                f"immutable, write to a new part id")

    def _state(self) -> dict:
        """The part's record as it stands ({} when missing; garbled metadata is no commit, only leftovers)."""
        try:
            return part_state(self._store, self.part_id) or {}
        except ValueError:
            return {}

    @property
    def _path(self) -> str:
        return f"parts/{self.part_id}"

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._closed:
            self.abort()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"part {self.part_id!r}: writer already committed or aborted")

    def _convert(self, utt_id: str, name: str, frames: np.ndarray | StoredFrames) -> StoredFrames:
        """Float (T, D) frames, (T, L, D) for an encoder with `layers` (or frames the pipeline already converted
        with `store_frames`) as stored."""
        if name not in self._encoders:                        # registered after this writer started?
            self._encoders = read_encoders(self._store)
        info = self._encoders.get(name)
        if info is None:
            raise StoreError(f"utterance {utt_id!r}: encoder {name!r} is not registered in {self.url} "
                             f"(registered: {sorted(self._encoders)})")
        given = isinstance(frames, StoredFrames)
        x = frames.values if given else np.asarray(frames)
        kind_ok = x.dtype == np.dtype(info.dtype) if given else np.issubdtype(x.dtype, np.floating)
        shape = ("T", info.dim) if info.layers is None else ("T", info.n_layers, info.dim)
        if x.ndim != len(shape) or x.shape[1:] != shape[1:] or x.shape[0] == 0 or not kind_ok:
            raise StoreError(f"utterance {utt_id!r}, encoder {name!r}: expected a non-empty "
                             f"{info.dtype if given else 'float'} ({', '.join(map(str, shape))}) array, "
                             f"got {x.dtype} {x.shape}")
        if given and (info.dtype == "int8") != (frames.scale is not None and frames.scale.shape == x.shape[:-1]):
            raise StoreError(f"utterance {utt_id!r}, encoder {name!r}: int8 frames need one scale per frame, "
                             "float frames none (with layers: one per frame and layer)")
        stored = frames if given else store_frames(x, info.dtype)
        if not stored.finite():
            raise StoreError(f"utterance {utt_id!r}, encoder {name!r}: features contain NaN or inf "
                             f"(as {info.dtype})")
        return stored

    def add(self, utt: Utterance, features: dict[str, np.ndarray | StoredFrames]) -> None:
        """Add one utterance's table row and its (T, D) features per encoder ((T, L, D) for one with `layers`:
        stored as T rows of L·D values), float frames or `store_frames`' output (the frames go to the shard files
        now); StoreError leaves nothing added."""
        self._check_open()
        if not isinstance(utt.id, str) or not utt.id:
            raise StoreError(f"utterance id {utt.id!r}: must be a non-empty string")
        if utt.id in self._ids:
            raise StoreError(f"utterance {utt.id!r}: added twice to part {self.part_id!r}")
        _check_row(utt)
        converted = {name: self._convert(utt.id, name, frames) for name, frames in features.items()}
        self._rows.append(utt)
        self._ids.add(utt.id)
        for name, stored in converted.items():
            stream = self._stream(self._encoders[name], stored.values.dtype)
            stream.spool.append(stored.values.reshape(len(stored.values), -1))
            stream.ids.append(utt.id)
            stream.lengths.append(len(stored.values))
            stream.checksums.append(frames_checksum(stored.values, stored.scale))
            if stored.scale is not None:
                stream.scales.append(stored.scale.reshape(-1))

    def _stream(self, info: EncoderInfo, dtype: np.dtype) -> _EncoderStream:
        stream = self._streams.get(info.name)
        if stream is None:
            self._start()
            key = f"{self._path}/features/{info.name}/frames/c/0/0"
            where = os.path.join(local_path(self.url), key) if is_local(self.url) else \
                os.path.join(self._spool_dir, info.name)
            chunk_rows = max(1, CHUNK_TARGET_BYTES // (info.width * dtype.itemsize))
            spool = ShardSpool(where, info.width, dtype, chunk_rows, info.compression == "zstd", ZSTD_LEVEL)
            stream = self._streams[info.name] = _EncoderStream(spool, key)
        return stream

    def _start(self) -> None:
        """Before the first byte: drop leftovers of a killed writer of this part id, mark the part uncommitted."""
        if self._started:
            return
        upgrade_root(self._store, self.url)
        if self._state().get("committed"):                        # a damaged commit being redone:
            zarr.open_group(self._store, path=self._path, mode="r+").update_attributes(   # hidden first, then deleted
                {"mtser_part": {"committed": False, "writer": _writer_id()}})
        sync(self._store.delete_dir(self._path))
        zarr.create_group(self._store, path=self._path,
                          attributes={"mtser_part": {"committed": False, "writer": _writer_id()}})
        if not is_local(self.url):
            self._spool_dir = tempfile.mkdtemp(prefix=f"mtser-{self.part_id}-")
        self._started = True

    def add_failure(self, utt_id: str, path: str | None, stage: str, reason: str) -> None:
        """Record an utterance that could not be processed: nothing of it is written (the part's `failures`)."""
        self._check_open()
        self._failures.append((str(utt_id), path or "", str(stage), str(reason)))

    def add_warning(self, utt_id: str, path: str | None, stage: str, reason: str) -> None:
        """Record something worth knowing about an utterance that is kept and written (the part's `warnings`)."""
        self._check_open()
        self._warnings.append((str(utt_id), path or "", str(stage), str(reason)))

    def abort(self) -> None:
        """Drop everything: what was streamed is deleted, nothing stays in the store, the claim is released."""
        self._drop(delete=self._started)

    def _drop(self, delete: bool) -> None:
        """Close the spools, delete the part's files if `delete`, give the claim up, forget everything."""
        for stream in self._streams.values():
            stream.spool.close()
        try:
            if delete:
                sync(self._store.delete_dir(self._path))
            self._cleanup()
        finally:
            self._claim.release()
        self._rows, self._ids, self._streams, self._failures, self._warnings = [], set(), {}, [], []
        self._closed = True

    def _cleanup(self) -> None:
        if self._spool_dir is not None:
            shutil.rmtree(self._spool_dir, ignore_errors=True)
            self._spool_dir = None

    def commit(self) -> None:
        """Finish the shard files, write the small arrays, then mark the part committed (the one write that makes
        it visible)."""
        self._check_open()
        self._check_claim()
        self._start()
        try:
            group = zarr.open_group(self._store, path=self._path, mode="r+")
            _write_table(group, "utterances", {"id": [u.id for u in self._rows],
                                               **{c: [getattr(u, c) for u in self._rows] for c in TABLE_COLUMNS}})
            for table, rows in (("failures", self._failures), ("warnings", self._warnings)):
                _write_table(group, table, {c: [r[j] for r in rows] for j, c in enumerate(FAILURE_COLUMNS)})
            summary = {name: self._write_encoder(group, self._encoders[name], stream)
                       for name, stream in sorted(self._streams.items())}
        finally:
            self._cleanup()
        self._check_claim()
        now = time.time_ns()
        group.update_attributes({"mtser_part": {
            "committed": True, "committed_ns": now, "schema_version": SCHEMA_VERSION,
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9)),
            "writer": _writer_id(), "mtser_version": __version__, "n_utterances": len(self._rows),
            "n_failures": len(self._failures), "n_warnings": len(self._warnings), "encoders": summary}})
        self._closed = True
        self._claim.release()

    def _check_claim(self) -> None:
        """Refuse to commit once the claim's lease ran out (another machine may be writing this part now)."""
        if not self._claim.valid():
            self._drop(delete=False)                      # the part's files may be another writer's by now
            raise StoreError(f"{self.url}: part {self.part_id!r}: this writer's claim expired (no heartbeat for "
                             f"{self._claim.lease_s:.0f} s); nothing committed, rerun to redo the part")

    def _write_encoder(self, group: zarr.Group, info: EncoderInfo, stream: _EncoderStream) -> dict[str, Any]:
        prefix, spool = f"features/{info.name}", stream.spool
        stored_bytes = spool.finish()
        if not is_local(self.url):
            upload(self.url, self.storage_options, stream.key, spool.path)
        group.create_array(
            f"{prefix}/frames", shape=(spool.rows, info.width), dtype=spool.dtype,
            chunks=(spool.chunk_rows, info.width),
            shards=(spool.n_chunks * spool.chunk_rows, info.width), fill_value=0,
            compressors=ZstdCodec(level=ZSTD_LEVEL) if info.compression == "zstd" else None,
            config={"write_empty_chunks": True})                # metadata only: the shard file is written
        offsets = np.zeros(len(stream.lengths) + 1, dtype=np.int64)
        np.cumsum(stream.lengths, out=offsets[1:])
        _write_strings(group, f"{prefix}/ids", stream.ids)
        _write_small(group, f"{prefix}/offsets", offsets)
        _write_small(group, f"{prefix}/crc32", np.array(stream.checksums, dtype=np.uint32))
        if info.dtype == "int8":
            _write_small(group, f"{prefix}/scale", np.concatenate(stream.scales))
        return {"n": len(stream.ids), "frames": spool.rows, "dim": info.dim, "dtype": info.dtype,
                "nbytes": spool.rows * info.width * spool.dtype.itemsize, "stored_bytes": stored_bytes}


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
