"""Corpus files by local path or fsspec URL (`s3://bucket/MSP-Podcast/Audios/x.wav`), through one interface.

Local paths stay the strings the user gave (joined with `pathlib`); URLs are joined with `/` and listed and read
through fsspec with the same storage options as the store (`--storage-options`). Folder listings are cached, so
checking that each of many manifest rows' audio exists costs one listing per folder, not one request per row.
Imports fsspec only.
"""
from __future__ import annotations

import io
import os
import posixpath
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterable

import fsspec

HEADER_BLOCK = 64 * 1024        # bytes fetched per request when only an audio file's header is read
STREAM_BLOCK = 8 * 2**20        # bytes fetched per request when a long recording is decoded block by block


def is_url(location: str | Path) -> bool:
    """The one URL check: an fsspec URL other than file:// (which is read as the local path it names)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def absolute(location: str | Path) -> str:
    """A URL as given; a local path (or file:// URL) resolved to an absolute path, which means the same in any
    working directory (Ray workers run in their own)."""
    return str(location) if is_url(location) else str(Path(_local(str(location))).resolve())


def remote_errors() -> tuple[type[Exception], ...]:
    """Errors of remote file systems that are not OSError (botocore's, e.g. an unreachable S3 endpoint)."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return ()
    return (BotoCoreError,)


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


class CorpusFiles:
    """List and read a corpus's files wherever they are; every error names the path or URL."""

    def __init__(self, storage_options: dict | None = None):
        self.storage_options = dict(storage_options or {})
        self._listings: dict[str, dict[str, str]] = {}

    # ---------------------------------------------------------------------------------------------------- paths
    @staticmethod
    def join(base: str, *parts: str) -> str:
        if is_url(base):
            return posixpath.join(base.rstrip("/"), *parts)
        return str(Path(_local(base)).joinpath(*parts))

    @staticmethod
    def parent(path: str) -> str:
        if is_url(path):
            protocol, rest = path.split("://", 1)
            return f"{protocol}://{posixpath.dirname(rest.rstrip('/'))}"
        return str(Path(_local(path)).parent)

    @staticmethod
    def name(path: str) -> str:
        return PurePosixPath(path.rstrip("/")).name if is_url(path) else Path(_local(path)).name

    @staticmethod
    def is_absolute(path: str) -> bool:
        return is_url(path) or Path(_local(path)).is_absolute()

    def fs(self, path: str) -> Any:
        """The fsspec filesystem of `path` (fsspec caches one instance per protocol and options)."""
        if is_url(path):
            return fsspec.filesystem(path.split("://", 1)[0], **self.storage_options)
        return fsspec.filesystem("file")

    # ---------------------------------------------------------------------------------------------------- queries
    def listing(self, folder: str) -> dict[str, str]:
        """{name: "file" | "directory"} of the entries directly in `folder` (empty when it is no folder); cached."""
        key = folder.rstrip("/") if is_url(folder) else str(Path(_local(folder)))
        if key not in self._listings:
            self._listings[key] = self._list_url(folder) if is_url(folder) else _list_local(key)
        return self._listings[key]

    def _list_url(self, folder: str) -> dict[str, str]:
        fs = self.fs(folder)
        try:
            entries = fs.ls(folder, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        base = fs._strip_protocol(folder).rstrip("/")
        return {posixpath.basename(e["name"].rstrip("/")): e["type"] for e in entries if e["name"].rstrip("/") != base}

    def file_names(self, folder: str) -> set[str]:
        return {n for n, kind in self.listing(folder).items() if kind == "file"}

    def kind(self, path: str) -> str | None:
        """"file", "directory" (or "other") from the parent folder's cached listing; None when absent."""
        return self.listing(self.parent(path)).get(self.name(path))

    def is_file(self, path: str) -> bool:
        return self.kind(path) == "file"

    @staticmethod
    def outside_links(folder: str, names: Iterable[str], *inside: str) -> dict[str, str]:
        """{name: real path} of the `/`-separated `names` under local `folder` that a symlink (the file itself or a
        folder on its way) leads out of `folder` and of every folder in `inside`, compared as real paths. {} for
        URLs: object stores have no links."""
        if is_url(folder):
            return {}
        bases = [os.path.realpath(_local(f)).rstrip(os.sep) for f in (folder, *inside)]
        real_dirs: dict[str, str] = {}
        found = {}
        for name in names:
            path = os.path.join(_local(folder), *name.split("/"))
            parent = os.path.dirname(path)
            if parent not in real_dirs:
                real_dirs[parent] = os.path.realpath(parent)
            real = (os.path.realpath(path) if os.path.islink(path)
                    else os.path.join(real_dirs[parent], os.path.basename(path)))
            if not any(real == b or real.startswith(b + os.sep) for b in bases):
                found[name] = real
        return found

    def is_dir(self, path: str) -> bool:
        return self.fs(path).isdir(_local(path))

    def exists(self, path: str) -> bool:
        return self.fs(path).exists(_local(path))

    def find_files(self, root: str) -> list[str]:
        """Every file under `root` (any depth) as a sorted `/`-separated path relative to `root`."""
        return sorted(name for name, kind in self.find(root).items() if kind == "file")

    def find(self, root: str) -> dict[str, str]:
        """{`/`-separated path relative to `root`: "file" | "directory"} of everything under `root` (any depth)."""
        fs = self.fs(root)
        base = fs._strip_protocol(_local(root)).rstrip("/")
        found = fs.find(_local(root), withdirs=True, detail=True)
        return {posixpath.relpath(p, base): _followed(p, info["type"]) for p, info in found.items()
                if p.rstrip("/") != base}

    # ---------------------------------------------------------------------------------------------------- reads
    def read_bytes(self, path: str) -> bytes:
        return self.fs(path).cat_file(_local(path))

    def read_many(self, paths: list[str]) -> dict[str, bytes | Exception]:
        """The bytes of each path (concurrent requests on object stores); an exception where one read failed."""
        if not paths:
            return {}
        if not is_url(paths[0]):
            out: dict[str, bytes | Exception] = {}
            for path in paths:
                try:
                    out[path] = self.read_bytes(path)
                except OSError as exc:
                    out[path] = exc
            return out
        fs = self.fs(paths[0])
        got = fs.cat([fs._strip_protocol(p) for p in paths], on_error="return")
        return {p: got[fs._strip_protocol(p)] for p in paths}

    def open_whole(self, path: str) -> BinaryIO | str:
        """Something soundfile reads all of `path` from: the local path itself, or a URL's bytes (one request)."""
        return io.BytesIO(self.read_bytes(path)) if is_url(path) else _local(path)

    def open_header(self, path: str) -> Any:
        """A seekable file whose reads fetch small blocks (for headers), or the local path itself."""
        if not is_url(path):
            return _local(path)
        return self.fs(path).open(path, "rb", block_size=HEADER_BLOCK, cache_type="readahead")

    def open_stream(self, path: str) -> Any:
        """A seekable file read in large sequential blocks (long recordings decoded in pieces), or the local path."""
        if not is_url(path):
            return _local(path)
        return self.fs(path).open(path, "rb", block_size=STREAM_BLOCK, cache_type="readahead")


def _followed(path: str, kind: str) -> str:
    """A local symlink's kind as what it points to (fsspec says "other"), like `_list_local`."""
    if kind != "other":
        return kind
    return "file" if os.path.isfile(path) else "directory" if os.path.isdir(path) else "other"


def _list_local(folder: str) -> dict[str, str]:
    """Like an fsspec listing, but symlinks count as what they point to (corpora are often linked in)."""
    try:
        with os.scandir(folder) as entries:
            return {e.name: "file" if e.is_file() else "directory" if e.is_dir() else "other" for e in entries}
    except (FileNotFoundError, NotADirectoryError):
        return {}
