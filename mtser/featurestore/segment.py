"""Segment: one encoder's frames within one committed part, and the one read planner for every frames read.

A segment knows its utterance ids, their row offsets, per-frame int8 scales, the per-utterance checksums written at
commit, and how to read one or many utterances' stored frames. `read_segments` plans every read, local or remote,
single or batched: per utterance the byte ranges of the shard file it covers (one range for mtser's raw layout,
one per touched inner chunk otherwise), never asking for an inner chunk the shard index marks as not written
(those read as the fill value, as in zarr). A local source fills one-range reads straight into the result
(`os.preadv`); a batching (remote) source fetches all ranges of a batch concurrently. Frames arrays in any other
Zarr layout are sliced through zarr-python. `frames_checksum` is the one checksum of stored frames: the writer records
it, every read checks it (zlib's crc32 runs at several GB/s, faster than the copy the read makes; a segment's crc32
array is fetched once, in one batch with the other segments of the read), and verify checks every utterance.
`structure_problems` is what the reader checks of a segment when it opens a part: ids, offsets, frames metadata and
the commit record must agree. `naming_failures` turns a failed batch read into an error naming the utterances that
fail alone. Imports numpy and zarr only.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import zarr

from mtser.featurestore.arrays import read_arrays
from mtser.featurestore.frames import decode_frames
from mtser.featurestore.layout import EncoderInfo, StoreError
from mtser.featurestore.shards import EMPTY_CHUNK, ByteSource, FramesLayout, FramesReader, ShardFormatError


class FramesChecksumError(StoreError):
    """An utterance's stored frames do not match the checksum recorded at commit."""


def frames_checksum(frames: np.ndarray, scale: np.ndarray | None) -> int:
    """zlib.crc32 of an utterance's stored frame bytes, continued over its int8 scales (the `crc32` array)."""
    crc = zlib.crc32(np.ascontiguousarray(frames).data)
    return crc if scale is None else zlib.crc32(np.ascontiguousarray(scale).data, crc)


@dataclass
class Segment:
    """One encoder's frames within one committed part (`parts/<part>/features/<encoder>`)."""

    part: str
    info: EncoderInfo
    ids: np.ndarray                       # utterance ids (object array of str), in frame order
    offsets: np.ndarray                   # int64 (n+1): utterance i is rows offsets[i]:offsets[i+1]
    layout: FramesLayout | None           # None: not mtser's shard layout, read through zarr-python
    store: Any                            # the zarr store (small arrays, zarr-python fallback)
    reader: FramesReader | None = None
    _scale: np.ndarray | None = None
    _array: Any = None
    _crc: np.ndarray | None = None

    @property
    def path(self) -> str:
        return f"parts/{self.part}/features/{self.info.name}"

    def rows(self, i: int) -> tuple[int, int]:
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def small_array(self, name: str) -> np.ndarray:
        """One of the segment's one-chunk arrays ("crc32", "scale"), its chunk checksum verified."""
        try:
            return read_arrays(self.store, [f"{self.path}/{name}"])[0]
        except (KeyError, ValueError, OSError) as exc:
            raise StoreError(f"cannot read {self.path}/{name}: {exc}") from exc

    def checksums(self) -> np.ndarray:
        """The crc32 per utterance recorded at commit (read once)."""
        if self._crc is None:
            self._crc = self._checked_crc(self.small_array("crc32"))
        return self._crc

    def _checked_crc(self, crc: np.ndarray) -> np.ndarray:
        if len(crc) != len(self.ids):
            raise StoreError(f"{self.path}/crc32 has {len(crc)} entries for {len(self.ids)} utterances")
        return crc

    def structure_problems(self, record: Any, frames_meta: dict | None) -> list[str]:
        """How the segment's ids, offsets, frames metadata (`frames_meta`, its zarr.json) and its entry in the
        part's commit record (`record`) contradict each other; found without reading frames."""
        n, offsets, dim, problems = len(self.ids), self.offsets, self.info.dim, []
        rows = None
        if len(offsets) != n + 1 or offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
            problems.append(f"offsets are not 0 < ... strictly increasing with {n + 1} entries (one per utterance + 1): "
                            f"{len(offsets)} offsets for {n} ids")
        else:
            rows = int(offsets[-1])
        if frames_meta is None:
            problems.append("the frames array has no metadata (zarr.json)")
        else:
            shape = frames_meta.get("shape")
            if rows is not None and shape != [rows, self.info.width]:
                problems.append(f"frames shape is {shape}, offsets and the encoder's provenance say "
                                f"{[rows, self.info.width]}")
            if frames_meta.get("data_type") != self.info.dtype:
                problems.append(f"frames are {frames_meta.get('data_type')}, the encoder's provenance says "
                                f"{self.info.dtype}")
        if not isinstance(record, dict):
            return problems + ["the part's commit record has no entry for this encoder"]
        expected = {"n": n, "dim": dim, "dtype": self.info.dtype}
        if rows is not None:
            expected |= {"frames": rows, "nbytes": rows * self.info.width * np.dtype(self.info.dtype).itemsize}
        wrong = [f"{key} {record.get(key)!r} (arrays: {value!r})" for key, value in expected.items()
                 if record.get(key) != value]
        if wrong:
            problems.append("the commit record disagrees with the arrays: " + ", ".join(wrong))
        return problems

    def scales(self, i: int) -> np.ndarray | None:
        """Per-frame int8 scales of the utterance at position `i`, L per frame (frame-major, flat); None for float
        encoders."""
        if self.info.dtype != "int8":
            return None
        if self._scale is None:
            self._scale = self.small_array("scale")
        start, stop = self.rows(i)
        return self._scale[start * self.info.n_layers: stop * self.info.n_layers]

    def checksum(self, i: int, stored: np.ndarray) -> int:
        """`frames_checksum` of the utterance at position `i`, given its stored frames."""
        return frames_checksum(stored, self.scales(i))

    def decode(self, i: int, stored: np.ndarray, dtype: Any = None, pick: list[int] | None = None) -> np.ndarray:
        """Stored rows as values (`frames.decode_frames`): int8 dequantised to float32, then cast to `dtype`.
        (T, D) for a store without `layers` and `pick` None; else (T, L, D), the layers at positions `pick`
        (`EncoderInfo.pick`) or all of them."""
        info, scale = self.info, self.scales(i)
        if info.layers is not None or pick is not None:
            stored = stored.reshape(len(stored), info.n_layers, info.dim)
            scale = None if scale is None else scale.reshape(len(stored), info.n_layers)
            if pick is not None and pick != list(range(info.n_layers)):
                stored, scale = stored[:, pick], None if scale is None else scale[:, pick]
        return decode_frames(stored, scale, dtype)

    def read(self, i: int) -> np.ndarray:
        """Stored frames of the utterance at position `i` (int8 encoders: the int8 values)."""
        return read_segments([(self, i)])[0]

    def read_many(self, positions: list[int]) -> list[np.ndarray]:
        return read_segments([(self, i) for i in positions])

    def check_shard_index(self) -> None:
        """Load and check the shard index (ShardFormatError when corrupt); a no-op for other layouts."""
        if self.reader is not None:
            self.reader.ranges(0, 1)

    def padding(self) -> np.ndarray | None:
        """The bytes between the last frame and the shard index (all zero when intact); None if not applicable."""
        return self.reader.padding() if self.reader is not None else None

    def zarr_rows(self, start: int, stop: int) -> np.ndarray:
        if self._array is None:
            self._array = zarr.open_array(self.store, path=f"{self.path}/frames", mode="r")
        return np.asarray(self._array[start:stop])


def read_segments(hits: list[tuple[Segment, int]], into: list[np.ndarray] | None = None,
                  pick: list[int] | None = None) -> list[np.ndarray]:
    """Stored frames of each (segment, position) as new writable (rows, L·D) arrays: the one read planner (see
    module doc). An utterance's rows hold all its layers, so it is one byte range however many are wanted.

    `into` (one array per hit, e.g. the rows of a padded batch: (rows, D), or (rows, L', D) for the layers at
    positions `pick`, all of them if None): fill those instead, with the frames' values (int8 dequantised) cast to
    each array's dtype (`Segment.decode`); where the stored bytes already are the array's dtype and every layer is
    wanted in stored order, a local one-range read goes straight into it. Returns `into` then."""
    _load_checksums(list({id(seg): seg for seg, _ in hits if seg._crc is None}.values()))
    plans: list[tuple[Segment, int, int, int, list | None]] = []
    requests: dict[ByteSource, list[tuple[str, int, int]]] = {}
    for seg, i in hits:
        start, stop = seg.rows(i)
        if seg.reader is None:
            plans.append((seg, i, start, stop, None))
            continue
        pieces = seg.reader.ranges(start, stop)
        plans.append((seg, i, start, stop, pieces))
        if seg.reader.source.batches or not _one_range(pieces):
            requests.setdefault(seg.reader.source, []).extend(
                (seg.layout.shard_key, a, b) for _, a, b, _ in pieces if a != EMPTY_CHUNK)
    blobs = {source: iter(source.read_many(reqs)) for source, reqs in requests.items()}
    out = []
    for k, (seg, i, start, stop, pieces) in enumerate(plans):
        target = None if into is None else into[k]
        if pieces is None:
            frames = seg.zarr_rows(start, stop)
        elif not seg.reader.source.batches and _one_range(pieces):
            direct = (target is not None and seg.info.dtype != "int8" and target.dtype == seg.layout.dtype
                      and target.size == (stop - start) * seg.layout.dim and target.flags.c_contiguous
                      and pick in (None, list(range(seg.info.n_layers))))
            frames = target if direct else np.empty((stop - start, seg.layout.dim), dtype=seg.layout.dtype)
            seg.reader.source.read_into(seg.layout.shard_key, pieces[0][1], frames)
            _check(seg, i, frames)
            if direct:
                out.append(target)
                continue
        else:
            got = blobs[seg.reader.source]
            frames = seg.reader.assemble(start, stop, pieces, [next(got) if a != EMPTY_CHUNK else b""
                                                               for _, a, _, _ in pieces])
        if pieces is None or seg.reader.source.batches or not _one_range(pieces):
            _check(seg, i, frames)
        if target is not None:
            target[...] = seg.decode(i, frames, pick=pick)
            frames = target
        out.append(frames)
    return out


def _load_checksums(segments: list[Segment]) -> None:
    """The recorded crc32 arrays of `segments`, fetched as one batch per store."""
    by_store: dict[int, list[Segment]] = {}
    for seg in segments:
        by_store.setdefault(id(seg.store), []).append(seg)
    for group in by_store.values():
        try:
            arrays = read_arrays(group[0].store, [f"{seg.path}/crc32" for seg in group])
        except (KeyError, ValueError, OSError):
            arrays = [seg.small_array("crc32") for seg in group]     # names the one that cannot be read
        for seg, crc in zip(group, arrays):
            seg._crc = seg._checked_crc(crc)


def _check(seg: Segment, i: int, stored: np.ndarray) -> None:
    """The stored frames of position `i` must have the checksum recorded at commit."""
    if seg.checksum(i, stored) != int(seg._crc[i]):
        raise FramesChecksumError(f"utterance {seg.ids[i]!r} in {seg.path}: checksum mismatch, its stored frames "
                                  f"differ from what was written (corrupt bytes; `mtser features verify` lists all)")


def _one_range(pieces: list[tuple[int, int, int, int]]) -> bool:
    """The utterance is one byte range of rows as stored (mtser's raw layout)."""
    return len(pieces) == 1 and pieces[0][0] == -1


READ_ERRORS = (OSError, ShardFormatError, ValueError, RuntimeError, StoreError)


@contextmanager
def naming_failures(url: str, utt_ids: list[str], hits: list[tuple[Segment, int]]) -> Iterator[None]:
    """A failed frames read of `hits` (the frames of `utt_ids` in the store at `url`) becomes a StoreError naming
    the utterances that fail when read alone (the first few, with their segments): the damaged ones, never their
    undamaged batch mates."""
    try:
        yield
    except READ_ERRORS as exc:
        damaged = [(u, seg) for u, (seg, i) in zip(utt_ids, hits) if not _reads_alone(seg, i)]
        if not damaged:
            raise StoreError(f"{url}: cannot read frames of a batch of {len(utt_ids)} utterances (each "
                             f"reads alone): {exc}") from exc
        where = ", ".join(f"{u!r} ({seg.path})" for u, seg in damaged[:3])
        more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        raise StoreError(f"{url}: cannot read frames of {where}{more} ({len(damaged)} of {len(utt_ids)} "
                         f"read together): {exc}") from exc


def _reads_alone(seg: Segment, i: int) -> bool:
    """Whether utterance `i` of `seg` reads on its own (to tell a damaged utterance from its batch mates)."""
    try:
        read_segments([(seg, i)])
    except READ_ERRORS:
        return False
    return True
