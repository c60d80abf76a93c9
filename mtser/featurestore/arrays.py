"""Batched reads of the store's small one-chunk index arrays (ids, offsets, checksums, table columns), and the
string encoding of schema 2.

Opening a store reads thousands of such arrays (a few per part and encoder); zarr-python spends about a
millisecond on each. These arrays are standard Zarr v3 with one chunk and the codec chain
`bytes|vlen-utf8 → zstd → crc32c`, so `read_arrays` fetches all metadata and chunk objects of a batch at once
(plain file reads locally, concurrent GETs remotely) and decodes them directly, checking the crc32c exactly as
zarr does. Any other chain is read through zarr-python. Imports numpy, zarr and zarr's own codec libraries only.

Strings (ids, string table columns) use Zarr v3 core types only since schema 2: a string column `<name>` is the
UTF-8 bytes of all values concatenated in `<name>/utf8` (uint8) plus `<name>/offsets` (int64, n+1), the same ragged
layout as frames, so every Zarr v3 implementation reads it. Schema-1 parts stored them in zarr-python's `string`
extension type (`vlen-utf8` codec); `read_columns` reads both.
"""
from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import VLenUTF8
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from mtser.errors import DataError
from mtser.featurestore.shards import ZSTD

FAST_CHAINS = (["bytes", "zstd", "crc32c"], ["vlen-utf8", "zstd", "crc32c"])


class ArrayChecksumError(DataError):
    """A chunk's crc32c does not match its bytes."""


def fetch(store: Any, keys: list[str]) -> list[bytes | None]:
    """The objects at `keys` (None where missing), read as one batch."""
    if isinstance(store, zarr.storage.LocalStore):
        return [_read_file(os.path.join(str(store.root), key)) for key in keys]

    async def get_all() -> list[bytes | None]:
        bufs = await asyncio.gather(*(store.get(k, prototype=default_buffer_prototype()) for k in keys))
        return [None if b is None else b.to_bytes() for b in bufs]
    return sync(get_all())


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_arrays(store: Any, paths: list[str]) -> list[np.ndarray]:
    """Whole arrays at `paths`; KeyError names a missing array, ArrayChecksumError a corrupt chunk."""
    metas = fetch(store, [f"{p}/zarr.json" for p in paths])
    for path, meta in zip(paths, metas):
        if meta is None:
            raise KeyError(f"array {path!r} does not exist")
    parsed = [json.loads(m) for m in metas]
    fast = [_is_fast(m) for m in parsed]
    chunks = fetch(store, [f"{p}/{_chunk_key(m)}" for p, m, ok in zip(paths, parsed, fast) if ok])
    out, pending = [], iter(chunks)
    for path, meta, ok in zip(paths, parsed, fast):
        if ok:
            out.append(_decode(path, meta, next(pending)))
        else:
            out.append(np.asarray(zarr.open_array(store, path=path, mode="r")[...]))
    return out


def encode_strings(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(utf8 uint8 bytes of all values concatenated, int64 offsets of n+1 entries)."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def decode_strings(path: str, data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The object array of str encoded by `encode_strings`; ArrayChecksumError when the pair is inconsistent."""
    bounds = offsets.astype(np.int64).tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != len(data) or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ArrayChecksumError(f"string column {path!r}: offsets do not cover its {len(data)} utf8 bytes")
    raw = data.tobytes()
    out = np.empty(len(bounds) - 1, dtype=object)
    try:
        out[:] = [raw[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:])]
    except UnicodeDecodeError as exc:
        raise ArrayChecksumError(f"string column {path!r}: not UTF-8 ({exc.reason})") from exc
    return out


def string_arrays(path: str) -> tuple[str, str]:
    """The two arrays of a schema-2 string column."""
    return f"{path}/utf8", f"{path}/offsets"


def read_columns(store: Any, columns: list[tuple[str, bool, int]]) -> list[np.ndarray]:
    """Whole columns, each given as (path, is_string, schema version of its part), read as one batch; string
    columns come back as object arrays of str."""
    paths: list[str] = []
    for path, is_string, schema in columns:
        paths += string_arrays(path) if is_string and schema >= 2 else [path]
    arrays, out = iter(read_arrays(store, paths)), []
    for path, is_string, schema in columns:
        if is_string and schema >= 2:
            out.append(decode_strings(path, next(arrays), next(arrays)))
        else:
            out.append(np.asarray(next(arrays), dtype=object) if is_string else next(arrays))
    return out


def _is_fast(meta: dict) -> bool:
    try:
        one_chunk = meta["chunk_grid"]["configuration"]["chunk_shape"] == meta["shape"] or meta["shape"] == [0]
        return (one_chunk and len(meta["shape"]) == 1 and [c["name"] for c in meta["codecs"]] in FAST_CHAINS
                and meta["chunk_key_encoding"]["name"] == "default"
                and meta["codecs"][0].get("configuration", {}).get("endian", "little") == "little")
    except (KeyError, TypeError):
        return False


def _chunk_key(meta: dict) -> str:
    return "c" + meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") + "0"


def _decode(path: str, meta: dict, chunk: bytes | None) -> np.ndarray:
    (n,) = meta["shape"]
    is_str = meta["data_type"] == "string"
    dtype = np.dtype(object) if is_str else np.dtype(meta["data_type"]).newbyteorder("<")
    if chunk is None or n == 0:                    # zarr writes no chunk that equals the fill value
        return np.full(n, meta["fill_value"], dtype=dtype)
    body, stored = chunk[:-4], chunk[-4:]
    if np.uint32(google_crc32c.value(body)).tobytes() != stored:
        raise ArrayChecksumError(f"array {path!r}: chunk checksum mismatch (corrupt bytes)")
    raw = ZSTD.decode(body)
    values = VLenUTF8().decode(raw) if is_str else np.frombuffer(raw, dtype=dtype).copy()
    if len(values) != n:
        raise ArrayChecksumError(f"array {path!r}: chunk holds {len(values)} values, metadata says {n}")
    return values
