"""Part claims: the one writer of a part id, chosen by exclusive create, with a staleness rule for dead writers.

A writer claims part `P` by creating `claims/P/<generation>.json` (8 digits) exclusively: locally a fully written
temporary file is hard-linked to that name (`link` fails when the name exists), on object storage a conditional
PUT (`If-None-Match: *`, s3fs `pipe_file(mode="create")`) does the same. The highest generation is the claim in
force. Generation `g + 1` may only be created while generation `g` is released or stale, and only one creator of
`g + 1` succeeds, so at most one live writer holds a part. Claim files are never deleted (a deleted generation could
be created twice); they stay as a small record of who wrote each part.

A claim records its writer (`host`, the kernel's `boot_id`, `pid`, the process's start time) and a `heartbeat`
time its writer renews every lease/5 seconds. It is stale when its writer released it, when its writer ran on this
machine (same host and boot id) and that process is gone, or, from another machine, when its heartbeat is older
than the lease (`LEASE_SECONDS`). Imports fsspec and `layout` only.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from mtser.featurestore.files import is_url
from mtser.featurestore.layout import StoreError, local_path

LEASE_SECONDS = 600.0           # a claim from another machine whose heartbeat is older than this is stale
MAX_RACES = 50                  # lost exclusive creates in a row before giving up (other writers keep winning)


class PartClaimed(StoreError):
    """Another live writer holds the part."""

    def __init__(self, part_id: str, holder: Holder):
        self.part_id, self.holder = part_id, holder
        age = time.time() - holder.heartbeat
        super().__init__(f"part {part_id!r} is being written by another writer ({holder.host} pid {holder.pid}, "
                         f"heartbeat {age:.0f} s ago)")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown or no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                                  # exists, owned by someone else
    now = _start_ticks(pid)
    return start is None or now is None or now == start       # a reused pid has another start time


@dataclass(frozen=True)
class Holder:
    """The writer a claim file names."""

    host: str
    boot: str
    pid: int
    start: int | None
    token: str
    heartbeat: float
    released: bool = False

    @staticmethod
    def me(token: str) -> Holder:
        return Holder(socket.gethostname(), _boot_id(), os.getpid(), _start_ticks(os.getpid()), token, time.time())

    def live(self, lease_s: float) -> bool:
        if self.released:
            return False
        if self.host == socket.gethostname() and self.boot and self.boot == _boot_id():
            return _alive(self.pid, self.start)
        return time.time() - self.heartbeat < lease_s

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def parse(raw: bytes) -> Holder:
        return Holder(**json.loads(raw))


class _Files:
    """The claim folder of one part: list, read, create exclusively, overwrite (local files or fsspec)."""

    def __init__(self, url: str, storage_options: dict | None, part_id: str):
        self.local = not is_url(url)
        if self.local:
            self.fs: Any = None
            self.dir = os.path.join(local_path(url), "claims", part_id)
        else:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
            self.dir = f"{root.rstrip('/')}/claims/{part_id}"

    def generations(self) -> list[int]:
        if self.local:
            try:
                names = os.listdir(self.dir)
            except FileNotFoundError:
                return []
        else:
            self.fs.invalidate_cache(self.dir)
            try:
                names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.dir, detail=False)]
            except FileNotFoundError:
                return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _path(self, gen: int) -> str:
        return f"{self.dir}/{gen:08d}.json"

    def read(self, gen: int) -> bytes:
        if self.local:
            with open(self._path(gen), "rb") as f:
                return f.read()
        return self.fs.cat_file(self._path(gen))

    def create(self, gen: int, data: bytes) -> bool:
        """Write generation `gen` unless it exists; False when another writer created it first."""
        if not self.local:
            try:
                self.fs.pipe_file(self._path(gen), data, mode="create")
                return True
            except FileExistsError:
                return False
        os.makedirs(self.dir, exist_ok=True)
        tmp = self._tmp(data)
        try:
            os.link(tmp, self._path(gen))                     # atomic, complete, fails if the name exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def overwrite(self, gen: int, data: bytes) -> None:
        if self.local:
            os.replace(self._tmp(data), self._path(gen))
        else:
            self.fs.pipe_file(self._path(gen), data)

    def _tmp(self, data: bytes) -> str:
        tmp = os.path.join(self.dir, f".{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp


def holder_of(url: str, storage_options: dict | None, part_id: str, lease_s: float = LEASE_SECONDS) -> Holder | None:
    """The live writer holding `part_id`, or None when nobody does."""
    files = _Files(url, storage_options, part_id)
    gens = files.generations()
    if not gens:
        return None
    holder = Holder.parse(files.read(gens[-1]))
    return holder if holder.live(lease_s) else None


class Claim:
    """This writer's claim on one part: `acquire` (PartClaimed when another live writer has it), a heartbeat
    thread renewing it, `valid` before writes that must not race a successor, `release`."""

    def __init__(self, url: str, storage_options: dict | None, part_id: str, lease_s: float = LEASE_SECONDS):
        self.part_id, self.lease_s = part_id, lease_s
        self._files = _Files(url, storage_options, part_id)
        self._token = uuid.uuid4().hex
        self._gen: int | None = None
        self._renewed = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        for _ in range(MAX_RACES):
            gens = self._files.generations()
            if gens:
                holder = Holder.parse(self._files.read(gens[-1]))
                if holder.live(self.lease_s):
                    raise PartClaimed(self.part_id, holder)
            gen = (gens[-1] + 1) if gens else 1
            me = Holder.me(self._token)
            if self._files.create(gen, me.to_bytes()):
                self._gen, self._renewed = gen, me.heartbeat
                self._thread = threading.Thread(target=self._beat, name=f"mtser-claim-{self.part_id}", daemon=True)
                self._thread.start()
                return
        raise StoreError(f"part {self.part_id!r}: lost the claim race {MAX_RACES} times in a row")

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 5):
            try:
                self.renew()
            except OSError:
                pass                                          # `valid` tells the writer once the lease ran out

    def renew(self) -> None:
        me = Holder.me(self._token)
        self._files.overwrite(self._gen, me.to_bytes())
        self._renewed = me.heartbeat

    def valid(self) -> bool:
        """Still ours: held, and renewed recently enough that no other machine may have taken it over."""
        return self._gen is not None and time.time() - self._renewed < self.lease_s * 0.8

    def release(self) -> None:
        """Give the part up (after commit or abort); idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._gen is not None:
            self._files.overwrite(self._gen, Holder(**{**asdict(Holder.me(self._token)), "released": True}).to_bytes())
            self._gen = None
