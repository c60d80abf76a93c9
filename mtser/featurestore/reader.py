"""FeatureStore: thread-safe, read-only access to a store; the latest commit of an utterance wins."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Iterator

import numpy as np
import pandas as pd
from zarr.core.sync import sync

from mtser.featurestore.arrays import fetch, read_columns
from mtser.featurestore.layout import (
    FAILURE_COLUMNS, FLOAT_COLUMNS, TABLE_COLUMNS, EncoderInfo, StoreError, alist_dir, byte_source, create_store,
    is_local, local_path, part_schema, read_encoders, root_attrs, zarr_store,
)
from mtser.featurestore.segment import Segment, naming_failures, read_segments
from mtser.featurestore.shards import FramesLayout, FramesReader


COMMIT_RECORD = {"committed_ns", "n_utterances", "encoders"}     # written only with `committed: true`


@dataclass
class Part:
    """One committed part: its commit record and its frames per encoder."""

    name: str
    attrs: dict                           # the part's mtser_part attributes (counts and sizes per encoder)
    segments: dict[str, Segment]

    @property
    def committed_ns(self) -> int:
        return int(self.attrs["committed_ns"])

    @property
    def n_utterances(self) -> int:
        return int(self.attrs.get("n_utterances", 0))

    @property
    def n_failures(self) -> int:
        return int(self.attrs.get("n_failures", 0))

    @property
    def n_warnings(self) -> int:
        return int(self.attrs.get("n_warnings", 0))          # schema-1 parts have no warnings table


@dataclass
class _State:
    parts: dict[str, Part]                                   # committed parts, oldest commit first
    index: dict[str, dict[str, tuple[Segment, int]]]         # encoder -> id -> (segment, position)


class FeatureStore:
    """Read access to a store; open with `open_store`. Thread-safe; never writes."""

    def __init__(self, url: str, storage_options: dict | None = None, strict: bool = True):
        """`strict=False` (for verify) records unreadable parts in `broken_parts` instead of raising."""
        self.url = url
        self._strict = strict
        self.broken_parts: dict[str, str] = {}
        self.skipped_parts: dict[str, str] = {}              # part -> why it is not read (not committed)
        self.storage_options = storage_options
        self._store = zarr_store(url, storage_options, read_only=True)
        if is_local(url) and not os.path.isdir(local_path(url)):
            raise StoreError(f"{url}: no such store (directory does not exist)")
        self.attrs = root_attrs(self._store, url)
        self._source = byte_source(url, storage_options)
        self._lock = threading.Lock()
        self._table: pd.DataFrame | None = None
        self._failures: pd.DataFrame | None = None
        self._effective: pd.DataFrame | None = None
        self._warnings: pd.DataFrame | None = None
        self.encoders: dict[str, EncoderInfo] = {}
        self._state = _State({}, {})
        self.refresh()

    # ------------------------------------------------------------------------------------------------ loading
    def refresh(self) -> None:
        """Pick up encoders and parts committed since open (committed parts never change)."""
        with self._lock:
            self.encoders = read_encoders(self._store)
            known = self._state.parts
            new = self._load_new_parts(set(known))
            if not new:
                return
            parts = dict(sorted({**known, **new}.items(), key=lambda kv: (kv[1].committed_ns, kv[0])))
            index: dict[str, dict[str, tuple[Segment, int]]] = {name: {} for name in self.encoders}
            for part in parts.values():                      # later commits overwrite earlier rows
                for name, seg in part.segments.items():
                    index.setdefault(name, {}).update(zip(seg.ids, zip(repeat(seg), range(len(seg.ids)))))
            self._state = _State(parts, index)
            self._table = self._failures = self._effective = self._warnings = None

    def _load_new_parts(self, known: set[str]) -> dict[str, Part]:
        names = [n for n in sync(alist_dir(self._store, "parts")) if n not in known]
        committed = {}
        self.skipped_parts = {}
        for name, raw in zip(names, fetch(self._store, [f"parts/{n}/zarr.json" for n in names])):
            try:
                attrs = json.loads(raw)["attributes"].get("mtser_part", {}) if raw is not None else None
            except (ValueError, KeyError, AttributeError) as exc:
                self._part_failed(name, exc)
                continue
            if attrs is None or (attrs.get("committed") is False and not set(attrs) & COMMIT_RECORD):
                writer = f" by {attrs['writer']}" if attrs and "writer" in attrs else ""
                self.skipped_parts[name] = f"not committed: being written{writer}, or left by an interrupted writer"
            elif attrs.get("committed") is True:
                committed[name] = attrs
            else:
                self._part_failed(name, StoreError("no commit marker (`committed: true`) although the part has a "
                                                   "commit record: damaged"))
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

    def _load_parts(self, committed: dict[str, dict]) -> dict[str, Part]:
        """Segments of the given committed parts: ids and offsets per encoder, read as one batch."""
        keys = [(part, enc) for part, attrs in committed.items() for enc in attrs.get("encoders", {})]
        unknown = [(p, e) for p, e in keys if e not in self.encoders]
        if unknown:
            raise StoreError(f"encoder {unknown[0][1]!r} has frames in part {unknown[0][0]!r} but is not registered")
        bases = [f"parts/{part}/features/{enc}" for part, enc in keys]
        arrays = read_columns(self._store, [(f"{b}/{a}", a == "ids", part_schema(committed[part]))
                                            for (part, _), b in zip(keys, bases) for a in ("ids", "offsets")])
        metas = fetch(self._store, [f"{b}/frames/zarr.json" for b in bases])
        parts = {name: Part(name, attrs, {}) for name, attrs in committed.items()}
        for k, ((part, enc), base, meta) in enumerate(zip(keys, bases, metas)):
            frames_meta = json.loads(meta) if meta is not None else None
            layout = FramesLayout.parse(f"{base}/frames", frames_meta) if frames_meta is not None else None
            seg = parts[part].segments[enc] = Segment(
                part, self.encoders[enc], np.asarray(arrays[2 * k], dtype=object), arrays[2 * k + 1].astype(np.int64),
                layout, self._store, FramesReader(self._source, layout) if layout else None)
            problems = seg.structure_problems(committed[part]["encoders"][enc], frames_meta)
            if problems:
                raise StoreError(f"encoder {enc!r}: {'; '.join(problems)}")
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
    def failure_history(self) -> pd.DataFrame:
        """Every failure row ever committed (nothing of these utterances was written by that part): id, path,
        stage, reason, part; in commit order."""
        if self._failures is None:
            parts = [p.name for p in self._state.parts.values() if p.n_failures]
            self._failures = self._read_tables(parts, "failures", FAILURE_COLUMNS)
        return self._failures

    @property
    def failures(self) -> pd.DataFrame:
        """The effective failures: failure rows of utterances that no later commit wrote (the history keeps all)."""
        if self._effective is None:
            history = self.failure_history
            if not history.empty:
                order = {name: k for k, name in enumerate(self._state.parts)}
                written_after = history["id"].map(self._last_written(order)).fillna(-1) > history["part"].map(order)
                history = history[~written_after.to_numpy()].reset_index(drop=True)
            self._effective = history
        return self._effective

    def _last_written(self, order: dict[str, int]) -> dict[str, int]:
        """id -> commit position of the last part whose utterance table has it."""
        parts = [p for p in self._state.parts if self._state.parts[p].n_utterances]
        ids = self._read_tables(parts, "utterances", ("id",)).assign(
            part=np.repeat(parts, [self._state.parts[p].n_utterances for p in parts]))
        return dict(zip(ids["id"], ids["part"].map(order)))

    @property
    def warnings(self) -> pd.DataFrame:
        """Things worth knowing about utterances that were kept and written: id, path, stage, reason, part."""
        if self._warnings is None:
            parts = [p.name for p in self._state.parts.values() if p.n_warnings]
            self._warnings = self._read_tables(parts, "warnings", FAILURE_COLUMNS)
        return self._warnings

    def _read_tables(self, parts: list[str], table: str, columns: tuple[str, ...]) -> pd.DataFrame:
        """One table (utterances, failures or warnings) of several parts, rows in part order; failures and warnings
        also get "part"."""
        extra = () if table == "utterances" else ("part",)
        if not parts:
            return _empty_table(columns + extra)
        try:
            arrays = read_columns(self._store, [(f"parts/{p}/{table}/{c}", c not in FLOAT_COLUMNS,
                                                 part_schema(self._state.parts[p].attrs))
                                                for p in parts for c in columns])
        except (KeyError, ValueError) as exc:             # a missing array, a corrupt chunk
            reason = exc.args[0] if exc.args else type(exc).__name__
            raise StoreError(f"{self.url}: the {table} table is unreadable ({reason}); run `mtser features verify`"
                             ) from None
        by_column = [arrays[j::len(columns)] for j in range(len(columns))]
        recorded = {"utterances": "n_utterances", "failures": "n_failures", "warnings": "n_warnings"}[table]
        for k, part in enumerate(parts):
            lengths = {len(column[k]) for column in by_column}
            expected = self._state.parts[part].attrs.get(recorded)
            if len(lengths) != 1 or (expected is not None and lengths != {int(expected)}):
                raise StoreError(f"{self.url}: part {part!r}: its {table} table has {sorted(lengths)} rows per "
                                 f"column, its commit record says {expected}; run `mtser features verify`")
        data = {c: _table_column(c, np.concatenate(v)) for c, v in zip(columns, by_column)}
        if extra:
            data["part"] = np.repeat(np.array(parts, dtype=object), [len(a) for a in by_column[0]])
        return pd.DataFrame(data)

    # ------------------------------------------------------------------------------------------------ lookups
    def committed_parts(self) -> set[str]:
        return set(self._state.parts)

    def _encoder_index(self, encoder: str) -> dict[str, tuple[Segment, int]]:
        index = self._state.index.get(encoder)
        if index is None:
            if encoder in self.encoders:                      # registered, no committed frames yet
                return {}
            raise StoreError(f"{self.url}: no encoder {encoder!r} in the store (encoders: {sorted(self.encoders)})")
        return index

    def locate(self, utt_id: str, encoder: str) -> tuple[Segment, int]:
        """The segment holding the utterance's frames for `encoder` (the latest commit's) and its position there."""
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
        seg, i = self.locate(utt_id, encoder)
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
                "layers": None if info.layers is None else list(info.layers),
                "compression": info.compression, "utterances": len(index),
                "per_split": {str(k): int(v) for k, v in split_of.reindex(list(index)).value_counts().items()},
                "frames": int(sum(int(seg.offsets[i + 1] - seg.offsets[i]) for seg, i in index.values())),
                "stored_bytes": int(sum(p.attrs["encoders"][name].get("stored_bytes", 0)
                                        for p in parts if name in p.segments))}
        return {"url": self.url, "schema_version": self.attrs["schema_version"], "parts": len(parts),
                "utterances": len(table), "per_split": {str(k): int(v) for k, v in split_of.value_counts().items()},
                "failures": len(self.failures), "warnings": len(self.warnings), "encoders": encoders}

    # ------------------------------------------------------------------------------------------------ frames
    def get(self, utt_id: str, encoder: str, dtype: Any = None, layers: list[int] | None = None) -> np.ndarray:
        """(T, D) frames in the stored dtype (int8 encoders: dequantised float32), or cast to `dtype`. An encoder
        stored with `layers` gives (T, L, D); `layers` (hidden-state indices it stores) gives (T, len(layers), D)
        those layers, in that order (a store without `layers` holds one: its `layer`)."""
        return self.get_many([utt_id], encoder, dtype, layers)[0]

    def get_many(self, utt_ids: list[str], encoder: str, dtype: Any = None, layers: list[int] | None = None
                 ) -> list[np.ndarray]:
        pick = self._info(encoder).pick(layers)
        hits = [self.locate(u, encoder) for u in utt_ids]
        with naming_failures(self.url, utt_ids, hits):
            raws = read_segments(hits)
            return [seg.decode(i, raw, dtype, pick) for (seg, i), raw in zip(hits, raws)]

    def read_into(self, utt_ids: list[str], encoder: str, out: np.ndarray, layers: list[int] | None = None
                  ) -> np.ndarray:
        """Frames of `utt_ids` into `out`; returns the lengths (B,). `out` is either a padded (B, T_max, ...) batch
        (each utterance in its row, zero after its last frame) or a packed (Σ lengths, ...) array (the utterances'
        frames back to back); `...` is what `get` gives per frame: (D,), or (L, D) with `layers` or a layered
        store. Local raw shards of `out`'s dtype are read by the kernel straight into place (`read_segments` with
        `into`); anything else is decoded and cast into place."""
        info = self._info(encoder)
        pick = info.pick(layers)
        hits = [self.locate(u, encoder) for u in utt_ids]
        lengths = np.array([int(seg.offsets[i + 1] - seg.offsets[i]) for seg, i in hits], dtype=np.int64)
        if out.ndim == (3 if info.layers is None and pick is None else 4):
            for row, n in enumerate(lengths):
                out[row, n:] = 0
            places = [out[row, :n] for row, n in enumerate(lengths)]
        else:
            ends = np.cumsum(lengths)
            places = [out[end - n:end] for end, n in zip(ends, lengths)]
        with naming_failures(self.url, utt_ids, hits):
            read_segments(hits, into=places, pick=pick)
        return lengths

    def _info(self, encoder: str) -> EncoderInfo:
        self._encoder_index(encoder)                          # StoreError naming an unknown encoder
        return self.encoders[encoder]

    # ------------------------------------------------------------------------------------------------ for verify
    def parts(self) -> list[Part]:
        """Committed parts, oldest commit first."""
        return list(self._state.parts.values())

    def part_table(self, part: str, table: str = "utterances") -> pd.DataFrame:
        return self._read_tables([part], table, ("id",) + TABLE_COLUMNS if table == "utterances" else FAILURE_COLUMNS)

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
