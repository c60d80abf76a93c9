"""mtser's shard layout: an utterance's frames as byte ranges of a standard Zarr v3 shard file.

A part's `frames` array is one shard (`sharding_indexed`, index at the end, index codecs bytes + crc32c) whose inner
chunks hold whole rows. The shard index is read once per array; when inner chunks are uncompressed and laid out
back to back (mtser writes them so), an utterance's rows are ONE byte range of the shard file, read with `os.preadv`
straight into the result array on a cached descriptor locally, or one ranged GET through fsspec. zstd-compressed
inner chunks are decoded one by one, only those the utterance touches. Anything else falls back to zarr-python
slicing. `ShardSpool` writes the same bytes zarr-python writes for such an array, as rows arrive. Imports numpy and
zarr's own dependencies only.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import Zstd

from mtser.errors import DataError

ZSTD = Zstd()                 # zarr's own zstd codec; stateless, shared by all threads

EMPTY_CHUNK = 2**64 - 1
MAX_CACHED_FDS = 512
READ_PIECE = 128 * 1024


class ShardFormatError(DataError):
    """A shard file or its index does not match the array metadata (corrupt or truncated)."""


class ByteSource:
    """Reads byte ranges of store keys (paths relative to the store root)."""

    batches: bool = False             # True: read_many issues its requests concurrently (worth batching for)

    def read(self, key: str, start: int, stop: int) -> bytes:
        raise NotImplementedError

    def read_many(self, key_ranges: list[tuple[str, int, int]]) -> list[bytes]:
        return [self.read(k, a, b) for k, a, b in key_ranges]

    def read_into(self, key: str, start: int, out: np.ndarray) -> None:
        """Fill the C-contiguous array `out` with the bytes of `key` from `start` on."""
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(self.read(key, start, start + out.nbytes), np.uint8)

    def size(self, key: str) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalByteSource(ByteSource):
    """`os.pread` on descriptors opened once per file (thread-safe: pread has no shared file position)."""

    def __init__(self, root: str):
        self.root = root
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, key: str) -> tuple[int, bool]:
        fd = self._fds.get(key)
        if fd is not None:
            return fd, False
        fd = os.open(os.path.join(self.root, key), os.O_RDONLY)
        with self._lock:
            if key in self._fds:            # another thread won the race
                os.close(fd)
                return self._fds[key], False
            if len(self._fds) < MAX_CACHED_FDS:
                self._fds[key] = fd
                return fd, False
        return fd, True                     # too many open files cached: caller closes it

    def read(self, key: str, start: int, stop: int) -> bytes:
        fd, close = self._fd(key)
        try:
            data = os.pread(fd, stop - start, start)
        finally:
            if close:
                os.close(fd)
        if len(data) != stop - start:
            raise ShardFormatError(f"{key}: file ends at byte {start + len(data)}, expected {stop}")
        return data

    def read_into(self, key: str, start: int, out: np.ndarray) -> None:
        """One copy, kernel to `out`, in READ_PIECE steps: on a cold page cache, successive 128 KiB reads let the
        kernel's readahead overlap disk and copy (against one large pread: docs/benchmarks.md, Random reads)."""
        fd, close = self._fd(key)
        flat = out.reshape(-1).view(np.uint8)
        got = 0
        try:
            while got < len(flat):
                n = os.preadv(fd, [flat[got:got + READ_PIECE]], start + got)
                if n == 0:
                    break
                got += n
        finally:
            if close:
                os.close(fd)
        if got != out.nbytes:
            raise ShardFormatError(f"{key}: file ends at byte {start + got}, expected {start + out.nbytes}")

    def size(self, key: str) -> int:
        return os.stat(os.path.join(self.root, key)).st_size

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


class FsspecByteSource(ByteSource):
    """Ranged reads through a synchronous fsspec filesystem (s3fs, gcsfs, ...); batches go out concurrently."""

    batches = True

    def __init__(self, fs: Any, root: str):
        self.fs = fs
        self.root = root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def read(self, key: str, start: int, stop: int) -> bytes:
        data = self.fs.cat_file(self._path(key), start=start, end=stop)
        if len(data) != stop - start:
            raise ShardFormatError(f"{key}: file ends at byte {start + len(data)}, expected {stop}")
        return data

    def read_many(self, key_ranges: list[tuple[str, int, int]]) -> list[bytes]:
        if len(key_ranges) <= 1:
            return super().read_many(key_ranges)
        paths = [self._path(k) for k, _, _ in key_ranges]
        return self.fs.cat_ranges(paths, [a for _, a, _ in key_ranges], [b for _, _, b in key_ranges])

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))


@dataclass(frozen=True)
class FramesLayout:
    """What the fast path needs from a frames array's zarr.json; `None` from `parse` means: use zarr-python."""

    shard_key: str            # store key of the single shard file
    rows: int
    dim: int
    dtype: np.dtype
    chunk_rows: int
    n_chunks: int             # inner chunks in the shard (covers rows rounded up)
    compressed: bool          # zstd inner codec

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.row_bytes

    @property
    def index_bytes(self) -> int:
        return self.n_chunks * 16 + 4

    @staticmethod
    def parse(array_key: str, meta: dict) -> FramesLayout | None:
        try:
            rows, dim = meta["shape"]
            shard_rows, shard_dim = meta["chunk_grid"]["configuration"]["chunk_shape"]
            (codec,) = meta["codecs"]
            conf = codec["configuration"]
            chunk_rows, chunk_dim = conf["chunk_shape"]
            inner = [c["name"] for c in conf["codecs"]]
            index = [c["name"] for c in conf["index_codecs"]]
            endian = conf["codecs"][0].get("configuration", {}).get("endian", "little")
            sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        except (KeyError, TypeError, ValueError):
            return None
        ok = (codec["name"] == "sharding_indexed" and shard_rows >= rows and shard_dim == dim == chunk_dim
              and conf.get("index_location", "end") == "end" and index == ["bytes", "crc32c"]
              and inner in (["bytes"], ["bytes", "zstd"]) and endian == "little"
              and meta["chunk_key_encoding"]["name"] == "default" and shard_rows % chunk_rows == 0)
        if not ok:
            return None
        return FramesLayout(shard_key=f"{array_key}/c{sep}0{sep}0", rows=rows, dim=dim,
                            dtype=np.dtype(meta["data_type"]).newbyteorder("<"), chunk_rows=chunk_rows,
                            n_chunks=shard_rows // chunk_rows, compressed=len(inner) == 2)


class ShardSpool:
    """Writes one frames shard file as rows arrive, so a writer never holds its part's frames in memory.

    Inner chunks of `chunk_rows` whole rows are appended to `path` (raw rows go straight to the file; zstd buffers
    one chunk and compresses it when full); `finish` zero-pads the last chunk and appends the index (offset, nbytes
    per chunk) and its crc32c. The bytes equal what zarr-python writes for the same array with
    `write_empty_chunks` (tested).
    """

    def __init__(self, path: str, dim: int, dtype: np.dtype, chunk_rows: int, compressed: bool, level: int):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.dim, self.dtype, self.chunk_rows = path, dim, np.dtype(dtype), chunk_rows
        self.rows = 0
        self._codec = Zstd(level=level) if compressed else None
        self._pending = np.zeros((chunk_rows, dim), self.dtype) if compressed else None
        self._filled = 0
        self._index: list[tuple[int, int]] = []
        self._file = open(path, "wb")

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.dim * self.dtype.itemsize

    def append(self, frames: np.ndarray) -> None:
        """Append (T, dim) rows of the spool's dtype."""
        frames = np.ascontiguousarray(frames, dtype=self.dtype)
        self.rows += len(frames)
        if self._codec is None:
            self._file.write(memoryview(frames).cast("B"))
            return
        done = 0
        while done < len(frames):
            take = min(len(frames) - done, self.chunk_rows - self._filled)
            self._pending[self._filled:self._filled + take] = frames[done:done + take]
            self._filled += take
            done += take
            if self._filled == self.chunk_rows:
                self._flush_chunk()

    def _flush_chunk(self) -> None:
        blob = self._codec.encode(self._pending)
        self._index.append((self._file.tell(), len(blob)))
        self._file.write(blob)
        self._pending[:] = 0
        self._filled = 0

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def finish(self) -> int:
        """Pad the last chunk, write the index; the shard file's size in bytes."""
        if self._codec is None:
            data_bytes = self.n_chunks * self.chunk_bytes
            self._file.write(bytes(data_bytes - self._file.tell()))
            index = np.zeros((self.n_chunks, 2), dtype="<u8")
            index[:, 0] = np.arange(self.n_chunks, dtype=np.uint64) * np.uint64(self.chunk_bytes)
            index[:, 1] = self.chunk_bytes
        else:
            if self._filled:
                self._flush_chunk()
            index = np.array(self._index, dtype="<u8").reshape(-1, 2)
        raw = index.tobytes()
        self._file.write(raw + np.uint32(google_crc32c.value(raw)).tobytes())
        size = self._file.tell()
        self._file.close()
        return size

    def close(self) -> None:
        self._file.close()


def parse_shard_index(raw: bytes, n_chunks: int) -> np.ndarray:
    """The (n_chunks, 2) offset/nbytes table at the end of a shard; checks its crc32c."""
    body, stored = raw[:-4], raw[-4:]
    if len(body) != n_chunks * 16 or np.uint32(google_crc32c.value(body)).tobytes() != stored:
        raise ShardFormatError("shard index checksum mismatch (corrupt or truncated shard file)")
    return np.frombuffer(body, dtype="<u8").reshape(n_chunks, 2)


class FramesReader:
    """Reads row ranges of one frames array; the shard index is loaded on first use and kept."""

    def __init__(self, source: ByteSource, layout: FramesLayout):
        self.source = source
        self.layout = layout
        self._index: np.ndarray | None = None
        self._base: int | None = None          # byte offset of row 0 when chunks are contiguous and raw

    def _load_index(self) -> np.ndarray:
        if self._index is None:
            lay = self.layout
            size = self.source.size(lay.shard_key)
            if size < lay.index_bytes:
                raise ShardFormatError(f"{lay.shard_key}: {size} bytes, shorter than its index")
            index = parse_shard_index(self.source.read(lay.shard_key, size - lay.index_bytes, size), lay.n_chunks)
            if np.any((index[:, 0] != EMPTY_CHUNK) & (index[:, 0] + index[:, 1] > size - lay.index_bytes)):
                raise ShardFormatError(f"{lay.shard_key}: index points past the end of the file")
            if not lay.compressed:
                expected = index[0, 0] + np.arange(lay.n_chunks, dtype=np.uint64) * np.uint64(lay.chunk_bytes)
                if np.array_equal(index[:, 0], expected) and np.all(index[:, 1] == lay.chunk_bytes):
                    self._base = int(index[0, 0])
            self._index = index
        return self._index

    def ranges(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """(chunk, byte start, byte stop, first row of the range) pieces covering rows [start, stop)."""
        index = self._load_index()
        lay = self.layout
        if self._base is not None:
            return [(-1, self._base + start * lay.row_bytes, self._base + stop * lay.row_bytes, start)]
        first, last = start // lay.chunk_rows, (stop - 1) // lay.chunk_rows
        return [(k, int(index[k, 0]), int(index[k, 0]) + int(index[k, 1]), k * lay.chunk_rows)
                for k in range(first, last + 1)]

    def assemble(self, start: int, stop: int, pieces: list[tuple[int, int, int, int]], blobs: list[bytes]) -> np.ndarray:
        """Rows [start, stop) from the bytes of `pieces` (b"" for a chunk the index marks as not written)."""
        lay = self.layout
        out = np.empty((stop - start, lay.dim), dtype=lay.dtype)
        if len(pieces) == 1 and pieces[0][0] == -1:
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(blobs[0], np.uint8)
            return out
        for (k, off, _, row0), blob in zip(pieces, blobs):
            if off == EMPTY_CHUNK:
                chunk = np.zeros((lay.chunk_rows, lay.dim), dtype=lay.dtype)
            else:
                raw = ZSTD.decode(blob) if lay.compressed else blob
                if len(raw) != lay.chunk_bytes:
                    raise ShardFormatError(f"{lay.shard_key}: inner chunk {k} has {len(raw)} bytes, expected {lay.chunk_bytes}")
                chunk = np.frombuffer(raw, dtype=lay.dtype).reshape(lay.chunk_rows, lay.dim)
            a, b = max(start, row0), min(stop, row0 + lay.chunk_rows)
            out[a - start:b - start] = chunk[a - row0:b - row0]
        return out

    def padding(self) -> np.ndarray | None:
        """Bytes between the last row and the end of the last inner chunk (contiguous raw layout only)."""
        self._load_index()
        if self._base is None:
            return None
        lay = self.layout
        start, stop = self._base + lay.rows * lay.row_bytes, self._base + lay.n_chunks * lay.chunk_bytes
        if stop == start:
            return np.zeros(0, np.uint8)
        return np.frombuffer(self.source.read(lay.shard_key, start, stop), dtype=np.uint8)
