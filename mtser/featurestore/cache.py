"""A node-local copy of a remote store: downloaded once per node and per committed state, shared by every process on
the node that asks for it.

    $MTSER_CACHE_DIR/stores/<name>-<key>/    a plain local store: zarr.json, encoders/, the committed parts/
    $MTSER_CACHE_DIR/stores/<name>-<key>.lock

`key` hashes the store's URL and its committed parts (name and commit time), so a part committed later makes a new
copy instead of a half-updated old one. The copy is filled under an exclusive file lock into a temporary sibling and
renamed into place, so concurrent trials on one node download once and never read a half-written copy.

`cache_dir` is the one cache folder setting of mtser (store copies here, trials' work folders in `runs/`):
`$MTSER_CACHE_DIR` (set it per node), else `$XDG_CACHE_HOME/mtser`, else
`~/.cache/mtser`.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
from pathlib import Path

import fsspec

from mtser.featurestore.files import is_url
from mtser.featurestore.layout import local_path
from mtser.featurestore.reader import open_store

CACHE_ENV = "MTSER_CACHE_DIR"


def cache_dir() -> Path:
    """This node's mtser cache folder: $MTSER_CACHE_DIR, else $XDG_CACHE_HOME/mtser, else ~/.cache/mtser."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mtser"


def cache_key(url: str, parts: dict[str, int]) -> str:
    """A short hash of the store URL and its committed parts (part name -> commit time in ns)."""
    text = url.rstrip("/") + "\n" + "\n".join(f"{name} {ns}" for name, ns in sorted(parts.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_store(url: str, storage_options: dict | None = None) -> str:
    """A local path holding the store at `url` as committed now; a local `url` is returned as given."""
    if not is_url(url):
        return local_path(url)
    store = open_store(url, storage_options=storage_options)
    parts = {p.name: p.committed_ns for p in store.parts()}
    store.close()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[:60] or "store"
    target = cache_dir() / "stores" / f"{name}-{cache_key(url, parts)}"
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                # released when the file closes (or the process dies)
        if not target.is_dir():
            _download(url, storage_options, sorted(parts), target)
    return str(target)


def _download(url: str, storage_options: dict | None, parts: list[str], target: Path) -> None:
    """Copy the store's files, of its parts only the given ones, into a temporary sibling renamed to `target`."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    keep = set(parts)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    sources = []
    for path in sorted(fs.find(root)):
        folders = path[len(root) + 1:].split("/")
        if folders[0] == "parts" and len(folders) > 2 and folders[1] not in keep:
            continue                                   # a part committed after `parts` was listed, or never
        sources.append(path)
    targets = [str(tmp / path[len(root) + 1:]) for path in sources]
    for dest in {os.path.dirname(t) for t in targets}:
        os.makedirs(dest, exist_ok=True)
    fs.get(sources, targets)                           # concurrent where the filesystem is asynchronous (s3fs)
    os.replace(tmp, target)
