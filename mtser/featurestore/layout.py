"""What every part of the store shares: errors, provenance records, constants, store access, store creation.

See docs/store-format.md for the layout. Imports numpy, zarr and fsspec only.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import fsspec
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from mtser import __version__
from mtser.errors import MtserError
from mtser.featurestore.files import is_url, remote_errors
from mtser.featurestore.shards import ByteSource, FsspecByteSource, LocalByteSource

SCHEMA_VERSION: int = 2                 # 2: Zarr v3 core data types only (strings as utf8 bytes + offsets)
FORMAT_NAME = "mtser-feature-store"
DTYPES = ("float16", "float32", "int8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
COMPRESSIONS = ("none", "zstd")
ZSTD_LEVEL = 3
CHUNK_TARGET_BYTES = 64 * 1024          # inner chunk size of frames arrays (the unit zarr-python reads)
FLOAT_COLUMNS = ("arousal", "valence", "dominance", "duration")
TABLE_COLUMNS = ("split", "emo_class", "arousal", "valence", "dominance", "speaker", "gender", "duration",
                 "transcript", "transcript_source", "augmentation", "source_id")
FAILURE_COLUMNS = ("id", "path", "stage", "reason")          # columns of the failures and the warnings tables
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StoreError(MtserError):
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
    config: dict                  # mtser.configio.to_dict(EncoderConfig) the features were extracted with
    compute_dtype: str = "float32"  # the forward pass's dtype: "float32" | "bfloat16" | "float16" (older stores:
                                    # float32, the only one mtser computed in before)
    layers: tuple[int, ...] | None = None   # hidden-state indices stored side by side, frames (T, L, D) per utterance
                                            # (rows of L·D values); None: one state (`layer` / `mean_last_k`)

    def __post_init__(self) -> None:
        if self.layers is not None:                 # JSON and configs give a list
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def n_layers(self) -> int:
        """L, the hidden states stored per frame (1 without `layers`)."""
        return 1 if self.layers is None else len(self.layers)

    @property
    def width(self) -> int:
        """Values per stored row (frame): L·D."""
        return self.n_layers * self.dim

    def pick(self, layers: list[int] | None) -> list[int] | None:
        """Positions in a stored row of the hidden states `layers` (as stored: `layers`, or the one `layer` of a
        store without them); None for `layers` None. StoreError naming the ones the store does not hold."""
        if layers is None:
            return None
        stored = list(self.layers) if self.layers is not None else [self.layer] if self.mean_last_k == 1 else []
        missing = [k for k in layers if k not in stored]
        if missing or not layers:
            held = stored or f"the mean of the last {self.mean_last_k} layers only"
            raise StoreError(f"encoder {self.name!r}: layers {missing or '[]'} not stored (stored: {held})")
        return [stored.index(k) for k in layers]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "encoder") -> EncoderInfo:
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING]
        if missing:
            raise StoreError(f"{where}: provenance lacks {missing}")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})

    def validate(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise StoreError(f"encoder {self.name!r}: name must match {NAME_PATTERN.pattern}")
        if self.dtype not in DTYPES:
            raise StoreError(f"encoder {self.name!r}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise StoreError(f"encoder {self.name!r}: compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.dim < 1:
            raise StoreError(f"encoder {self.name!r}: dim must be positive, got {self.dim}")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)
                                        or any(not isinstance(k, int) or k < 0 for k in self.layers)):
            raise StoreError(f"encoder {self.name!r}: layers must be distinct hidden-state indices >= 0, "
                             f"got {self.layers}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise StoreError(f"encoder {self.name!r}: compute_dtype must be one of {COMPUTE_DTYPES}, "
                             f"got {self.compute_dtype!r}")

    def differs_from(self, other: EncoderInfo) -> list[str]:
        """Fields whose values differ, mtser_version aside. Config keys one of the two lacks (an mtser version
        added them) are not compared: a key that matters is also a field of its own (compute_dtype)."""
        diff = [f for f in self.to_dict()
                if f not in ("mtser_version", "config") and getattr(self, f) != getattr(other, f)]
        shared = set(self.config) & set(other.config)
        if any(self.config[k] != other.config[k] for k in shared):
            diff.append("config")
        return diff


# --------------------------------------------------------------------------------------------------------- store access
def is_local(url: str) -> bool:
    """A local path or file:// URL: not `files.is_url`."""
    return not is_url(url)


def local_path(url: str) -> str:
    return os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)


def zarr_store(url: str, storage_options: dict | None, read_only: bool) -> Any:
    if is_local(url):
        return zarr.storage.LocalStore(local_path(url), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)


def byte_source(url: str, storage_options: dict | None) -> ByteSource:
    if is_local(url):
        return LocalByteSource(local_path(url))
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return FsspecByteSource(fs, root)


def upload(url: str, storage_options: dict | None, key: str, local_file: str) -> None:
    """Copy a local file to `key` of a remote store, streamed (multipart where the filesystem supports it)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.put_file(local_file, f"{root.rstrip('/')}/{key}")


def get_json(store: Any, key: str) -> dict | None:
    return sync(aget_json(store, key))


async def aget_json(store: Any, key: str) -> dict | None:
    buf = await store.get(key, prototype=default_buffer_prototype())
    return None if buf is None else json.loads(buf.to_bytes())


async def alist_dir(store: Any, prefix: str) -> list[str]:
    """The entries under `prefix`, listed afresh: an object store's filesystem caches listings per process, and
    parts committed by other processes (extraction actors, other nodes) must show up."""
    fs = getattr(store, "fs", None)
    if fs is not None:
        fs.invalidate_cache(f"{store.path}/{prefix}".rstrip("/"))
    names = [name async for name in store.list_dir(prefix)]
    return sorted(n for n in names if n != "zarr.json" and not n.endswith(".partial"))


def root_attrs(store: Any, url: str) -> dict:
    """The root's mtser attributes; StoreError when `url` is not an mtser store or one too new to read."""
    try:
        meta = get_json(store, "zarr.json")
    except (OSError, ValueError, *remote_errors()) as exc:
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


def part_schema(attrs: dict) -> int:
    """The schema version a part was written in (its commit record says so since schema 2)."""
    return int(attrs.get("schema_version", 1))


def upgrade_root(store: Any, url: str) -> None:
    """Raise the root's schema version to this mtser's before a part of that version is written, so an older
    mtser refuses the store clearly instead of misreading the new part. Idempotent; concurrent writers write the
    same bytes. Parts of older versions stay as they are and keep reading."""
    attrs = root_attrs(store, url)
    if attrs["schema_version"] < SCHEMA_VERSION:
        zarr.open_group(store, mode="r+").update_attributes({"mtser": {**attrs, "schema_version": SCHEMA_VERSION}})


def read_encoders(store: Any) -> dict[str, EncoderInfo]:
    async def load() -> dict[str, EncoderInfo]:
        names = await alist_dir(store, "encoders")
        metas = await asyncio.gather(*(aget_json(store, f"encoders/{n}/zarr.json") for n in names),
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
    store = zarr_store(url, storage_options, read_only=False)
    if get_json(store, "zarr.json") is None:
        if set(sync(alist_dir(store, ""))) - {"encoders", "parts", "claims"}:
            raise StoreError(f"{url}: exists and is not empty, but is not an mtser feature store")
        attrs = {"mtser": {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION,
                           "created_by": f"mtser {__version__}"}}
        _create_group_once(store, "", attrs)
    root_attrs(store, url)
    for child in ("encoders", "parts"):
        _create_group_once(store, child, {})


def _create_group_once(store: Any, path: str, attributes: dict) -> None:
    """Create a group unless one exists (never `overwrite=True`: in zarr that deletes everything below)."""
    if get_json(store, f"{path}/zarr.json" if path else "zarr.json") is not None:
        return
    try:
        zarr.create_group(store, path=path or None, attributes=attributes)
    except zarr.errors.ContainsGroupError:
        pass                                                  # another writer created it meanwhile


def register_encoder(url: str, info: EncoderInfo, storage_options: dict | None = None) -> None:
    """Record an encoder's provenance; a no-op if identical, StoreError if the name exists with other provenance."""
    info.validate()
    store = zarr_store(url, storage_options, read_only=False)
    root_attrs(store, url)
    existing = get_json(store, f"encoders/{info.name}/zarr.json")
    if existing is None:
        _create_group_once(store, f"encoders/{info.name}", {"mtser_encoder": info.to_dict()})
        existing = get_json(store, f"encoders/{info.name}/zarr.json")
    old = EncoderInfo.from_dict(existing["attributes"]["mtser_encoder"], f"encoder {info.name!r}")
    diff = old.differs_from(info)
    if diff:
        raise StoreError(f"{url}: encoder {info.name!r} is already registered with different provenance "
                         f"(fields {diff} differ); use another encoder name")


def part_state(store: Any, part_id: str) -> dict | None:
    """The part's mtser attributes, or None when the part does not exist (or has no metadata yet)."""
    meta = get_json(store, f"parts/{part_id}/zarr.json")
    return None if meta is None else meta.get("attributes", {}).get("mtser_part", {})
