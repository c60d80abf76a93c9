"""Extraction: plan shards, run the encoders in Ray actors, write one store part per shard.

- Shards are balanced by audio seconds (augmented copies included) and named from the corpus and the config, so
  the same command plans the same shards; committed shards are skipped on a rerun.
- Ray actors (one GPU each where the cluster has GPUs, else CPUs with torch threads split between them) take
  shards from the driver one at a time, so fast workers take more. A dead worker is replaced and its shard redone.
- Per-utterance problems (unreadable audio, silent audio, a failing encoder, ...) become failure rows in the shard's
  part; everything else is written.
- Inside an actor a prefetch thread decodes and resamples the next group of utterances while the current group
  runs through the encoders. Audio paths may be fsspec URLs, read with the store's storage options.
- Each encoder's compute dtype is resolved once on the driver (bfloat16 where the workers have GPUs, float32 on
  CPUs, unless the config names one) and recorded in its provenance; the actors run exactly that.
The per-utterance computation is `pipeline.Pipeline` (also what `mtser predict` runs, without this driver).
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from mtser import __version__
from mtser.configio import to_dict
from mtser.featurestore.audio import audio_durations
from mtser.featurestore.claims import holder_of
from mtser.featurestore.config import ExtractConfig, resolve_compute_dtype
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.files import CorpusFiles
from mtser.featurestore.models import content_hash, encoder_dim_and_rate, stored_layers
from mtser.featurestore.pipeline import Failure, Loaded, Pipeline
from mtser.featurestore.store import (
    EncoderInfo, FeatureStore, PartClaimed, PartCommitted, StoreError, StoreWriter, create_store, register_encoder,
)
from mtser.featurestore.verify import damaged_parts

MAX_SHARD_ATTEMPTS = 3          # a shard whose worker dies this often is reported failed, not retried forever
GROUP_BATCHES = 4               # a shard is decoded and encoded this many batches (batch_seconds) at a time
CLAIM_POLL_SECONDS = 2.0        # how often a run looks again at shards another writer holds


class ExtractError(RuntimeError):
    """The extraction as a whole cannot go on (workers keep dying before finishing any shard)."""


# ----------------------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    id: str                                  # the store part id
    utterances: tuple[Utterance, ...]
    rows: int                                # utterances + augmented copies it will write
    seconds: float                           # audio seconds of work, augmented copies included
    replaces: int | None = None              # committed_ns of a damaged commit of this part to redo


def plan_shards(utts: Sequence[Utterance], cfg: ExtractConfig, augment: int,
                storage_options: dict | None = None) -> list[Shard]:
    """Balance utterances into ceil(total / shard_seconds) shards by audio seconds (largest first onto the lightest
    shard). Ids hash the config and member ids (and the speech encoders' windowing when a member is longer than
    `window_seconds`: it changes only such utterances' features), so the same corpus and config always plan the same
    shards. Utterances without a duration get their audio header's."""
    copies = {u.id: 1 + (augment if u.split == "Train" else 0) for u in utts}
    seconds = _durations(utts, CorpusFiles(storage_options))
    # the header durations travel with the shard: its actor groups by them without reading the headers again
    utts = [u if u.duration or not d else replace(u, duration=d) for u, d in zip(utts, seconds)]
    weight = {u.id: d * copies[u.id] for u, d in zip(utts, seconds)}
    if not utts:
        return []
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


def write_shard(pipeline: Pipeline, shard: Shard, url: str, storage_options: dict | None, augment: int) -> dict[str, Any]:
    """Encode one shard and commit it as one store part; returns counts for the driver.

    The shard is encoded in groups of about GROUP_BATCHES batches of audio, each group's features streamed to the
    part before the next is encoded, while a prefetch thread decodes the group after it: a worker holds at most two
    groups, not its shard. A shard another writer holds or committed meanwhile is not encoded: the result then has
    "elsewhere" (why) instead of counts."""
    try:
        writer = StoreWriter(url, shard.id, storage_options, replaces=shard.replaces)
    except (PartClaimed, PartCommitted) as exc:
        return {"shard": shard.id, "elsewhere": str(exc)}
    with writer:
        return _encode_into(writer, pipeline, shard, augment)


def _encode_into(writer: StoreWriter, pipeline: Pipeline, shard: Shard, augment: int) -> dict[str, Any]:
    failures: list[Failure] = []
    written, seconds, encode_s, wait_s = 0, 0.0, 0.0, 0.0
    groups = _groups(shard.utterances, pipeline.cfg.batch_seconds * GROUP_BATCHES, pipeline.files)
    loads = prefetched(groups, lambda group: pipeline.load(group, augment))
    while True:
        tick = time.perf_counter()
        loaded = next(loads, None)
        tock = time.perf_counter()
        wait_s += tock - tick
        if loaded is None:
            break
        result = pipeline.encode(loaded)
        encode_s += time.perf_counter() - tock
        failures += result.failures
        for utt, feats in result.written:
            try:
                writer.add(utt, feats)
            except StoreError as exc:
                failures.append(Failure(utt, "store", str(exc)))
                continue
            written += 1
            seconds += utt.duration or 0.0
    for f in failures:
        writer.add_failure(f.utt.id, f.utt.path, f.stage, f.reason)
    writer.commit()
    return {"shard": shard.id, "written": written, "failed": len(failures), "seconds": seconds,
            "encode_seconds": encode_s, "audio_wait_seconds": wait_s,
            "failures": [(f.utt.id, f.stage, f.reason) for f in failures], "pid": os.getpid(), "node": _node_id()}


def prefetched(groups: Sequence[list[Utterance]], load: Callable[[list[Utterance]], Loaded]) -> Iterator[Loaded]:
    """`load(group)` of each group in order, the next one running in a background thread while the caller works
    on the current one (decoding and resampling overlap the encoders' forward passes)."""
    if not groups:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtser-prefetch") as pool:
        pending = pool.submit(load, groups[0])
        for following in (*groups[1:], None):
            current = pending.result()
            pending = pool.submit(load, following) if following is not None else None
            yield current


def _groups(utts: Sequence[Utterance], seconds: float, files: CorpusFiles) -> list[list[Utterance]]:
    """Consecutive groups of about `seconds` of audio each (durations from the corpus or the file header)."""
    groups: list[list[Utterance]] = [[]]
    total = 0.0
    for utt, duration in zip(utts, _durations(utts, files)):
        if groups[-1] and total + duration > seconds:
            groups.append([])
            total = 0.0
        groups[-1].append(utt)
        total += duration
    return groups


def _durations(utts: Sequence[Utterance], files: CorpusFiles) -> list[float]:
    """Seconds per utterance: the corpus's duration, else its audio header's (0.0 without a path)."""
    unknown = [u.path for u in utts if not u.duration and u.path]
    found = dict(zip(unknown, audio_durations(unknown, files)))
    return [u.duration or found.get(u.path, 0.0) for u in utts]


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - node id is informational
        return None


class ShardWorker:
    """A Ray actor: loads the encoders once, then encodes and commits whatever shards the driver hands it."""

    def __init__(self, cfg: dict, url: str, storage_options: dict | None, threads: int | None, augment: int):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.url, self.storage_options, self.augment = url, storage_options, augment
        self.pipeline = Pipeline(_extract_config(cfg), "cuda" if torch.cuda.is_available() else "cpu",
                                 storage_options)

    def run(self, shard: Shard) -> dict[str, Any]:
        return write_shard(self.pipeline, shard, self.url, self.storage_options, self.augment)

    def where(self) -> str:
        """"pid P, node N" of this worker, for the driver's messages."""
        return _where(os.getpid(), _node_id())


def _where(pid: int, node: str | None) -> str:
    """A worker as the driver's lines name it: its pid and (short) Ray node id."""
    return f"pid {pid}" + (f", node {node[:8]}" if node else "")


def _extract_config(data: dict) -> ExtractConfig:
    from mtser.configio import from_dict

    return from_dict(ExtractConfig, data)


# ----------------------------------------------------------------------------------------------------------- driver
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


def with_compute_dtypes(cfg: ExtractConfig, device: str) -> ExtractConfig:
    """`cfg` with every encoder's compute_dtype resolved for `device` (what the workers run and provenance says)."""
    return replace(cfg, encoders=[replace(e, compute_dtype=resolve_compute_dtype(e, device)) for e in cfg.encoders])


def register_encoders(url: str, cfg: ExtractConfig, storage_options: dict | None = None) -> None:
    """Create the store (if needed) and record each encoder's provenance (reads model configs, not weights).
    `cfg`'s compute dtypes must be resolved (`with_compute_dtypes`)."""
    create_store(url, storage_options)
    for enc in cfg.encoders:
        if enc.compute_dtype is None:
            raise ValueError(f"encoder {enc.name}: compute_dtype not resolved for a device")
        dim, rate = encoder_dim_and_rate(enc, cfg.sample_rate)
        register_encoder(url, EncoderInfo(
            name=enc.name, kind=enc.kind, model=enc.model, revision=enc.revision, content_hash=content_hash(enc.model),
            layer=enc.layer, mean_last_k=enc.mean_last_k, dim=dim, frame_rate=rate, dtype=enc.dtype,
            compression=enc.compression, sample_rate=cfg.sample_rate, mtser_version=__version__, config=to_dict(enc),
            compute_dtype=enc.compute_dtype, layers=stored_layers(enc),
        ), storage_options)


def reader_problems(problems: Sequence[Any], kept: Sequence[Utterance]) -> tuple[list[Failure], list[Failure]]:
    """Corpus-reader problems (`CorpusProblem`) as (failures, warnings) rows of stage "read": a problem about an
    utterance the reader kept (a duplicate row whose first occurrence was read, a transcript it could not use) is a
    warning; one about a row it skipped is a failure (nothing of it is written)."""
    kept_ids = {u.id for u in kept}
    rows = [(p, Failure(Utterance(id=p.item or p.source, path=p.source), "read", str(p))) for p in problems]
    return ([f for p, f in rows if p.item not in kept_ids], [f for p, f in rows if p.item in kept_ids])


def write_reader_problems(url: str, failures: Sequence[Failure], warnings: Sequence[Failure],
                          storage_options: dict | None = None) -> str | None:
    """Reader problems as one part whose id hashes its content (a rerun does not add it twice); its part id."""
    if not failures and not warnings:
        return None
    content = [[(p.utt.id, p.stage, p.reason) for p in rows] for rows in (failures, warnings)]
    part = f"reader-{hashlib.sha256(json.dumps(content).encode()).hexdigest()[:12]}"
    while True:                                         # a concurrent run writes the same part: let it finish
        try:
            writer = StoreWriter(url, part, storage_options)
        except PartCommitted:
            return part
        except PartClaimed:
            time.sleep(CLAIM_POLL_SECONDS)
            continue
        with writer:
            for p in failures:
                writer.add_failure(p.utt.id, p.utt.path, p.stage, p.reason)
            for p in warnings:
                writer.add_warning(p.utt.id, p.utt.path, p.stage, p.reason)
            writer.commit()
        return part


def extract(utts: Sequence[Utterance], cfg: ExtractConfig, url: str, *, workers: int = 1, address: str | None = None,
            augment: int | None = None, splits: Sequence[str] | None = None, problems: Sequence[Failure] = (),
            warnings: Sequence[Failure] = (), storage_options: dict | None = None,
            progress: bool = True, notify: Callable[[str], None] | None = None) -> ExtractSummary:
    """Extract `utts` into the store at `url` (workers=0: in this process, no Ray). `problems` are corpus rows the
    reader could not read (planned, failed), `warnings` notes on utterances it kept (see `reader_problems`).
    `notify` gets one line per event the user should see as it happens (a worker died, where its shard went);
    the lines are also kept in `summary.events`.

    The summary describes the plan as it stands in the store, earlier runs' parts included, so a resumed run
    reports the same outcome: every planned row is written or failed (written + failed = planned)."""
    start = time.perf_counter()
    augment = cfg.augment if augment is None else augment
    if splits:
        utts = [u for u in utts if u.split in set(splits)]
    with ray_session(address) if workers else _no_session():
        cfg = with_compute_dtypes(cfg, _worker_device(workers))
        register_encoders(url, cfg, storage_options)
        summary = ExtractSummary()
        reader_part = write_reader_problems(url, problems, warnings, storage_options)
        shards = plan_shards(utts, cfg, augment, storage_options)
        summary.planned, summary.shards = sum(s.rows for s in shards) + len(problems), len(shards)
        done, todo, summary.damaged = _store_state(shards, url, storage_options)
        summary.skipped, summary.shards_skipped = sum(s.rows for s in shards if s.id in done), len(done)
        todo.sort(key=lambda s: (-s.seconds, s.id))
        bar = _progress_bar(sum(s.rows for s in todo), progress)
        elsewhere: set[str] = set()                     # shards another writer holds or committed meanwhile

        def tell(line: str) -> None:
            summary.events.append(line)
            if notify is not None:
                notify(line)

        def record(result: dict[str, Any]) -> None:
            if "elsewhere" in result:
                elsewhere.add(result["shard"])
                return
            summary.audio_seconds += result["seconds"]
            summary.encode_seconds += result["encode_seconds"]
            summary.audio_wait_seconds += result["audio_wait_seconds"]
            summary.pids.add(result["pid"])
            if result["node"]:
                summary.nodes.add(result["node"])
            bar.update(result["written"] + result["failed"])
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{summary.audio_seconds / 3600 / max(elapsed, 1e-9):.4f} audio h/s")

        def run(shards_: list[Shard]) -> None:
            if shards_ and workers == 0:
                _run_in_process(shards_, cfg, url, storage_options, augment, summary, record)
            elif shards_:
                _run_ray(shards_, cfg, url, storage_options, augment, workers, summary, record, tell)

        try:
            run(todo)
            _await_others([s for s in todo if s.id in elsewhere], elsewhere, run, url, storage_options, summary,
                          bar)
        finally:
            bar.close()
            summary.wall_seconds = time.perf_counter() - start
    _outcome(summary, shards, reader_part, url, storage_options)
    return summary


def _store_state(shards: Sequence[Shard], url: str,
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


def _await_others(waiting: list[Shard], elsewhere: set[str], run: Callable[[list[Shard]], None], url: str,
                  storage_options: dict | None, summary: ExtractSummary, bar: Any) -> None:
    """Wait for the shards other writers hold (a concurrent run of the same plan, a retried job): each ends
    committed by them (counted in `summary.concurrent`), or is taken over and run here once its claim is released
    or stale (its writer died)."""
    while waiting:
        bar.set_postfix_str(f"waiting for {len(waiting)} shards other writers hold")
        time.sleep(CLAIM_POLL_SECONDS)
        done, todo, _ = _store_state(waiting, url, storage_options)
        finished = [s for s in waiting if s.id in done]
        summary.concurrent += sum(s.rows for s in finished)
        summary.shards_concurrent += len(finished)
        bar.update(sum(s.rows for s in finished))
        free = [s for s in todo if holder_of(url, storage_options, s.id) is None]
        elsewhere.clear()
        run(free)
        held = {s.id for s in todo} - {s.id for s in free} | elsewhere
        waiting = [s for s in todo if s.id in held]


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray as the caller has it, else started (or joined at `address`) for the duration and shut down after."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@contextmanager
def _no_session() -> Iterator[None]:
    yield


def _worker_device(workers: int) -> str:
    """"cuda" where the workers get GPUs (this process's for workers=0, the Ray cluster's otherwise), else "cpu"."""
    if workers == 0:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    import ray

    return "cuda" if int(ray.cluster_resources().get("GPU", 0)) else "cpu"


def actor_options(workers: int, tasks: int) -> tuple[int, int, dict[str, Any]]:
    """(actors, torch threads per actor, Ray actor options) for `workers` asked and `tasks` to do: one GPU per actor
    where the cluster has GPUs, else CPU actors splitting the cores; spread over the nodes (Ray is initialised)."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    workers = max(1, min(workers, gpus or cpus, tasks))
    node_cpus = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
    threads = max(1, min(cpus // workers, node_cpus))        # an actor asking more than a node has never starts
    options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": threads}
    # Ray renices its workers to 15: beside any other busy process (the driver included) an encoder actor then
    # gets a few percent of a core. Actors run at the driver's priority instead, as Ray's job supervisor does.
    priority = {"env_vars": {"RAY_worker_niceness": str(os.getpriority(os.PRIO_PROCESS, 0))}}
    return workers, threads, {**options, "scheduling_strategy": "SPREAD", "runtime_env": priority}


def _outcome(summary: ExtractSummary, shards: list[Shard], reader_part: str | None, url: str,
             storage_options: dict | None) -> None:
    """Written, failed and warnings of the plan's parts as the store has them now."""
    mine = {s.id for s in shards} | {reader_part}
    with FeatureStore(url, storage_options, strict=False) as store:
        summary.written = sum(p.n_utterances for p in store.parts() if p.name in mine)
        failures, warnings = store.failures, store.warnings
    summary.failures = list(failures[failures["part"].isin(mine)][["id", "stage", "reason"]]
                            .itertuples(index=False, name=None))
    summary.warnings = list(warnings[warnings["part"].isin(mine)][["id", "stage", "reason"]]
                            .itertuples(index=False, name=None))
    lost = sum(s.rows for s in shards if s.id in summary.shards_failed)      # shards that never committed
    summary.failed = len(summary.failures) + lost


def _identity(ref: Any) -> str:
    """A dead actor's "pid P, node N" (its `where` answer), or "identity unknown" when it died before answering."""
    import ray

    try:
        return ray.get(ref, timeout=0)
    except Exception:  # noqa: BLE001 - informational only
        return "identity unknown"


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text, at most 200 characters (Ray's are paragraphs)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="utt", desc="extract", disable=not enabled, dynamic_ncols=True)


def _run_in_process(todo: list[Shard], cfg: ExtractConfig, url: str, storage_options: dict | None, augment: int,
                    summary: ExtractSummary, record: Callable[[dict], None]) -> None:
    import torch

    summary.workers, summary.device = 0, "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = Pipeline(cfg, summary.device, storage_options)
    for shard in todo:
        try:
            record(write_shard(pipeline, shard, url, storage_options, augment))
        except Exception as exc:  # noqa: BLE001 - one shard's store error must not lose the others
            summary.shards_failed[shard.id] = f"{type(exc).__name__}: {exc}"


def _run_ray(todo: list[Shard], cfg: ExtractConfig, url: str, storage_options: dict | None, augment: int,
             workers: int, summary: ExtractSummary, record: Callable[[dict], None],
             tell: Callable[[str], None]) -> None:
    """Hand shards to actors one at a time; replace dead actors and redo their shards (Ray is initialised).
    `tell` gets a line per death (which worker, which shard, attempt k of MAX_SHARD_ATTEMPTS, what happens next) and
    per retried shard that then committed (on which worker, at which attempt)."""
    import ray
    from ray.exceptions import RayActorError, RayError

    actors: list[Any] = []
    try:
        workers, threads, options = actor_options(workers, len(todo))
        summary.workers, summary.device = workers, "cuda" if options.get("num_gpus") else "cpu"
        remote = ray.remote(ShardWorker).options(max_restarts=0, **options)
        args = (to_dict(cfg), url, storage_options, threads, augment)
        actors = [remote.remote(*args) for _ in range(workers)]
        where = [actor.where.remote() for actor in actors]       # answered before the actor's first shard
        queue, idle = deque(todo), list(range(workers))
        inflight: dict[Any, tuple[int, Shard]] = {}
        attempts: Counter[str] = Counter()
        deaths_in_a_row = 0
        while queue or inflight:
            while idle and queue:
                slot = idle.pop()
                shard = queue.popleft()
                inflight[actors[slot].run.remote(shard)] = (slot, shard)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            slot, shard = inflight.pop(ref)
            idle.append(slot)
            attempt = f"attempt {attempts[shard.id] + 1} of {MAX_SHARD_ATTEMPTS}"
            try:
                result = ray.get(ref)
                record(result)
                deaths_in_a_row = 0
                if attempts[shard.id]:
                    tell(f"shard {shard.id} committed on {attempt} by worker {slot} "
                         f"({_where(result['pid'], result['node'])})")
                continue
            except RayActorError as exc:
                error = f"worker died: {exc}"
                deaths_in_a_row += 1
                next_step = ("the shard goes back to the queue for the next free worker"
                             if attempts[shard.id] + 1 < MAX_SHARD_ATTEMPTS else "the shard is given up")
                tell(f"worker {slot} ({_identity(where[slot])}) died while encoding shard {shard.id} "
                     f"({len(shard.utterances)} utterances), {attempt}; it is replaced and {next_step} "
                     f"[Ray: {first_line(exc)}]")
                if deaths_in_a_row >= workers * MAX_SHARD_ATTEMPTS:
                    raise ExtractError(f"{deaths_in_a_row} workers died in a row without finishing a shard; "
                                       f"last: {error}") from None
                ray.kill(actors[slot], no_restart=True)
                actors[slot] = remote.remote(*args)
                where[slot] = actors[slot].where.remote()
            except RayError as exc:
                error = f"{type(exc).__name__}: {exc}"
                tell(f"shard {shard.id} failed on worker {slot}, {attempt}: {first_line(exc)}")
            attempts[shard.id] += 1
            if attempts[shard.id] < MAX_SHARD_ATTEMPTS:
                summary.retries += 1
                queue.appendleft(shard)
            else:
                summary.shards_failed[shard.id] = error
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
