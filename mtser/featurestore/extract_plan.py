"""Extraction planning: which utterances go into which shard (one store part each), which shards the store already
holds whole or damaged, and the plan's outcome as the store has it. No Ray, no torch, no audio: durations come with
the utterances (`extract_worker.with_durations` reads the missing ones from audio headers), and the store is read
through `FeatureStore` (numpy, zarr, fsspec).

Shards are balanced by audio seconds (augmented copies included) and named from the corpus and the config, so the
same command plans the same shards: a rerun skips the shards committed whole and redoes the damaged ones (resume).
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Sequence

from mtser.configio import to_dict
from mtser.featurestore.config import ExtractConfig
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.store import FeatureStore
from mtser.featurestore.verify import damaged_parts

CLAIM_POLL_SECONDS = 2.0        # how often a run looks again at parts another writer holds
MAX_SHARD_ATTEMPTS = 3          # a shard whose worker dies this often is reported failed, not retried forever


@dataclass(frozen=True)
class Shard:
    id: str                                  # the store part id
    utterances: tuple[Utterance, ...]
    rows: int                                # utterances + augmented copies it will write
    seconds: float                           # audio seconds of work, augmented copies included
    replaces: int | None = None              # committed_ns of a damaged commit of this part to redo


@dataclass(frozen=True)
class ShardResult:
    """One shard's outcome for the driver: counts and times, or `elsewhere` (why another writer has it)."""

    shard: str
    elsewhere: str | None = None
    written: int = 0
    failed: int = 0
    seconds: float = 0.0                     # audio written
    encode_seconds: float = 0.0              # in the encoders
    audio_wait_seconds: float = 0.0          # waiting for decoded audio
    pid: int = 0
    node: str | None = None


def plan_shards(utts: Sequence[Utterance], cfg: ExtractConfig, augment: int) -> list[Shard]:
    """Balance utterances into ceil(total / shard_seconds) shards by audio seconds (largest first onto the lightest
    shard; an utterance without a duration weighs nothing). Ids hash the config and member ids (and the speech
    encoders' windowing when a member is longer than `window_seconds`: it changes only such utterances' features),
    so the same corpus and config always plan the same shards."""
    if not utts:
        return []
    copies = {u.id: 1 + (augment if u.split == "Train" else 0) for u in utts}
    weight = {u.id: (u.duration or 0.0) * copies[u.id] for u in utts}
    n = min(len(utts), max(1, math.ceil(sum(weight.values()) / cfg.shard_seconds)))
    heap = [(0.0, i) for i in range(n)]
    members: list[list[Utterance]] = [[] for _ in range(n)]
    for utt in sorted(utts, key=lambda u: (-weight[u.id], u.id)):
        load, i = heapq.heappop(heap)
        members[i].append(utt)
        heapq.heappush(heap, (load + weight[utt.id], i))
    fingerprint = json.dumps({
        "encoders": to_dict(cfg.encoders), "sample_rate": cfg.sample_rate, "augment": augment, "seed": cfg.seed,
        "snr": cfg.augment_snr_db, "rt60": cfg.augment_rt60_s, "gain": cfg.augment_gain_db,
        "asr": [cfg.asr_language, cfg.asr_max_new_tokens]}, sort_keys=True)
    shards = []
    for i, group in enumerate(members):
        group.sort(key=lambda u: u.id)
        lines = [fingerprint, *(u.id for u in group)]
        if max(u.duration or 0.0 for u in group) > cfg.window_seconds:
            lines.insert(1, f"window {cfg.window_seconds} {cfg.window_context_seconds}")
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]
        shards.append(Shard(f"shard-{i:05d}-{digest}", tuple(group), sum(copies[u.id] for u in group),
                            sum(weight[u.id] for u in group)))
    return shards


def shard_groups(utts: Sequence[Utterance], seconds: float) -> list[list[Utterance]]:
    """Consecutive groups of about `seconds` of audio each (an utterance without a duration counts 0 s): the units
    a worker decodes and encodes at a time."""
    groups: list[list[Utterance]] = [[]]
    total = 0.0
    for utt in utts:
        duration = utt.duration or 0.0
        if groups[-1] and total + duration > seconds:
            groups.append([])
            total = 0.0
        groups[-1].append(utt)
        total += duration
    return groups


def store_state(shards: Sequence[Shard], url: str,
                storage_options: dict | None) -> tuple[set[str], list[Shard], dict[str, str]]:
    """(ids of the shards committed whole, the shards to do, {shard id: why its committed part is damaged}). A
    damaged part (unreadable; tables, index arrays or shard index wrong) is redone: its shard to do carries the
    commit to replace."""
    store = FeatureStore(url, storage_options, strict=False)
    try:
        ids = {s.id for s in shards}
        damaged = damaged_parts(store, ids)
        commits = {p.name: p.committed_ns for p in store.parts()}
        done = (store.committed_parts() & ids) - set(damaged)
    finally:
        store.close()
    todo = [replace(s, replaces=commits.get(s.id)) if s.id in damaged else s for s in shards if s.id not in done]
    return done, todo, damaged


@dataclass
class ExtractSummary:
    planned: int = 0                          # rows (utterances + augmented copies + unreadable corpus rows)
    written: int = 0                          # rows of the plan in the store, earlier runs included
    failed: int = 0                           # rows of the plan not written (failure rows, rows of failed shards)
    skipped: int = 0                          # rows of shards already committed by an earlier run
    concurrent: int = 0                       # rows of shards another writer committed during this run
    shards: int = 0
    shards_skipped: int = 0
    shards_concurrent: int = 0
    damaged: dict[str, str] = field(default_factory=dict)         # shard id -> why its committed part was redone
    shards_failed: dict[str, str] = field(default_factory=dict)   # shard id -> last error
    retries: int = 0                          # shard re-submissions after a worker died or a shard raised
    audio_seconds: float = 0.0                # audio written by this run
    encode_seconds: float = 0.0               # workers' time in the encoders (device busy or waited on), summed
    audio_wait_seconds: float = 0.0           # workers' time waiting for decoded audio (prefetch behind), summed
    wall_seconds: float = 0.0
    workers: int = 0
    device: str = "cpu"
    nodes: set[str] = field(default_factory=set)             # Ray node ids that committed shards
    pids: set[int] = field(default_factory=set)               # worker processes that committed shards
    failures: list[tuple[str, str, str]] = field(default_factory=list)   # (id, stage, reason): not written
    warnings: list[tuple[str, str, str]] = field(default_factory=list)   # (id, stage, reason): written anyway
    events: list[str] = field(default_factory=list)           # workers that died, shards retried (as notified)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.shards_failed

    def line(self) -> str:
        others = f", {self.concurrent} by concurrent writers" if self.shards_concurrent else ""
        text = (f"written {self.written}, failed {self.failed} of {self.planned} planned "
                f"({self.skipped} from earlier runs{others}); {len(self.warnings)} warnings; "
                f"shards {self.shards - self.shards_skipped - self.shards_concurrent}/{self.shards} run")
        if self.damaged:
            text += f", {len(self.damaged)} damaged parts redone"
        if self.shards_failed:
            text += f", {len(self.shards_failed)} shards FAILED"
        return text + f"; {self.audio_seconds / 3600:.3f} h audio in {self.wall_seconds:.1f} s"

    def add(self, result: ShardResult) -> None:
        """A shard this run committed."""
        self.audio_seconds += result.seconds
        self.encode_seconds += result.encode_seconds
        self.audio_wait_seconds += result.audio_wait_seconds
        self.pids.add(result.pid)
        self.nodes.update([result.node] if result.node else [])

    def start(self, shards: Sequence[Shard], done: set[str], damaged: dict[str, str], reader_rows: int) -> None:
        """The plan's size and what earlier runs left: `done` shard ids committed whole, `damaged` ones to redo."""
        self.planned, self.shards = sum(s.rows for s in shards) + reader_rows, len(shards)
        self.skipped, self.shards_skipped = sum(s.rows for s in shards if s.id in done), len(done)
        self.damaged = damaged

    def settle(self, shards: Sequence[Shard], reader_part: str | None, url: str,
               storage_options: dict | None) -> None:
        """Written, failed and warnings of the plan's parts as the store has them now (earlier runs' and other
        writers' included), so written + failed = planned."""
        mine = {s.id for s in shards} | {reader_part}
        with FeatureStore(url, storage_options, strict=False) as store:
            self.written = sum(p.n_utterances for p in store.parts() if p.name in mine)
            failures, warnings = store.failures, store.warnings
        self.failures = list(failures[failures["part"].isin(mine)][["id", "stage", "reason"]]
                             .itertuples(index=False, name=None))
        self.warnings = list(warnings[warnings["part"].isin(mine)][["id", "stage", "reason"]]
                             .itertuples(index=False, name=None))
        lost = sum(s.rows for s in shards if s.id in self.shards_failed)      # shards that never committed
        self.failed = len(self.failures) + lost


class ShardQueue:
    """The shards still to run, in order, and each one's failed attempts: a failed attempt puts a shard back at the
    front for the next free worker, until MAX_SHARD_ATTEMPTS; then it is given up (`summary.shards_failed`)."""

    def __init__(self, shards: Sequence[Shard], summary: ExtractSummary):
        self._shards, self._failed, self._summary = deque(shards), Counter[str](), summary

    def __len__(self) -> int:
        return len(self._shards)

    def pop(self) -> Shard:
        return self._shards.popleft()

    def attempt(self, shard: Shard) -> str:
        """"attempt k of N" for the shard's current attempt."""
        return f"attempt {self._failed[shard.id] + 1} of {MAX_SHARD_ATTEMPTS}"

    def retried(self, shard: Shard) -> bool:
        return self._failed[shard.id] > 0

    def put_back(self, shard: Shard) -> None:
        """Back at the front without counting an attempt (its worker never started)."""
        self._shards.appendleft(shard)

    def failed(self, shard: Shard, error: str) -> str:
        """Count the shard's current attempt as failed with `error`; what happens to the shard next, in words."""
        self._failed[shard.id] += 1
        if self._failed[shard.id] < MAX_SHARD_ATTEMPTS:
            self._summary.retries += 1
            self._shards.appendleft(shard)
            return "the shard goes back to the queue for the next free worker"
        self._summary.shards_failed[shard.id] = error
        return "the shard is given up"
