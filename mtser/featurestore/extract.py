"""Extraction's driver: plan the shards (`extract_plan`), hand them one at a time to the next free worker
(`extract_worker.ShardWorker`: Ray actors, one GPU each where the cluster has GPUs, else CPUs splitting the cores;
or this process), wait for shards other writers hold, and report the plan's outcome as the store has it.

Ray restarts a worker whose process dies (`max_restarts`); the driver puts the shard it held back in the queue for
the next free worker, says so in one line (`notify`: worker, pid, node, shard, attempt k of MAX_SHARD_ATTEMPTS), and
gives a shard up after MAX_SHARD_ATTEMPTS. A worker Ray cannot start or bring back (its constructor raised, or its
restarts ran out) leaves the pool; with none left the run stops with ExtractError.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from mtser.errors import MtserError
from mtser.featurestore.actors import (
    actor_error, actor_options, answer, first_line, ray_session, worker_label, workers_device,
)
from mtser.featurestore.claims import holder_of
from mtser.featurestore.config import ExtractConfig
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.extract_plan import (
    CLAIM_POLL_SECONDS, MAX_SHARD_ATTEMPTS, ExtractSummary, Shard, ShardQueue, ShardResult, plan_shards,
    store_state,
)
from mtser.featurestore.extract_worker import (
    ExtractJob, ShardWorker, reader_problems, register_encoders, with_compute_dtypes,
    with_durations, write_reader_problems,
)
from mtser.featurestore.pipeline import Failure


class ExtractError(MtserError, RuntimeError):
    """The extraction as a whole cannot go on (no worker can be started or brought back)."""


def extract(utts: Sequence[Utterance], cfg: ExtractConfig, url: str, *, workers: int = 1, address: str | None = None,
            augment: int | None = None, splits: Sequence[str] | None = None, problems: Sequence[Failure] = (),
            warnings: Sequence[Failure] = (), storage_options: dict | None = None,
            progress: bool = True, notify: Callable[[str], None] | None = None) -> ExtractSummary:
    """Extract `utts` into the store at `url` (workers=0: in this process, no Ray). `problems` are corpus rows the
    reader could not read (planned, failed), `warnings` notes on utterances it kept (see `reader_problems`).
    `notify` gets one line per event the user should see as it happens (a worker died, where its shard went);
    the lines are also kept in `summary.events`. The summary describes the plan as it stands in the store, earlier
    runs' parts included, so a resumed run reports the same outcome (written + failed = planned)."""
    start = time.perf_counter()
    augment = cfg.augment if augment is None else augment
    utts = [u for u in utts if not splits or u.split in set(splits)]
    summary, elsewhere = ExtractSummary(), set()           # elsewhere: shards another writer holds or committed
    with ray_session(address) if workers else nullcontext():
        job = ExtractJob(with_compute_dtypes(cfg, workers_device(workers)), url, storage_options, augment)
        register_encoders(url, job.cfg, storage_options)
        reader_part = write_reader_problems(url, problems, warnings, storage_options)
        shards = plan_shards(with_durations(utts, storage_options), job.cfg, augment)
        done, todo, damaged = store_state(shards, url, storage_options)
        summary.start(shards, done, damaged, len(problems))
        todo.sort(key=lambda s: (-s.seconds, s.id))
        bar = tqdm(total=sum(s.rows for s in todo), unit="utt", desc="extract", disable=not progress,
                   dynamic_ncols=True)

        def tell(line: str) -> None:
            summary.events.append(line)
            if notify is not None:
                notify(line)

        def record(result: ShardResult) -> None:
            if result.elsewhere is not None:
                elsewhere.add(result.shard)
                return
            summary.add(result)
            bar.update(result.written + result.failed)
            rate = summary.audio_seconds / 3600 / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{rate:.4f} audio h/s")

        def run(batch: list[Shard]) -> None:
            if batch and workers:
                _run_ray(batch, job, workers, summary, record, tell)
            elif batch:
                _run_in_process(batch, job, summary, record)

        try:
            run(todo)
            _await_others([s for s in todo if s.id in elsewhere], elsewhere, run, url, storage_options, summary, bar)
        finally:
            bar.close()
            summary.wall_seconds = time.perf_counter() - start
    summary.settle(shards, reader_part, url, storage_options)
    return summary


def _run_in_process(todo: list[Shard], job: ExtractJob, summary: ExtractSummary,
                    record: Callable[[ShardResult], None]) -> None:
    worker = ShardWorker(job)
    summary.workers, summary.device = 0, worker.device
    for shard in todo:
        try:
            record(worker.run(shard))
        except Exception as exc:  # noqa: BLE001 - one shard's store error must not lose the others
            summary.shards_failed[shard.id] = f"{type(exc).__name__}: {exc}"


def _run_ray(todo: list[Shard], job: ExtractJob, workers: int, summary: ExtractSummary,
             record: Callable[[ShardResult], None], tell: Callable[[str], None]) -> None:
    """The shards through up to `workers` actors (Ray is initialised); deaths as the module's docstring says."""
    import ray
    from ray.exceptions import RayActorError, RayError

    count, threads, options = actor_options(workers, len(todo))
    summary.workers, summary.device = count, "cuda" if options.get("num_gpus") else "cpu"
    # Ray restarts a dead actor; a death mid-shard costs that shard an attempt, so the bound is not reached while
    # shards have attempts left, and keeps an actor that dies while starting from restarting forever
    remote = ray.remote(ShardWorker).options(max_restarts=MAX_SHARD_ATTEMPTS * len(todo), max_task_retries=0,
                                             **options)
    actors = [remote.remote(job, threads) for _ in range(count)]
    names = [actor.where.remote() for actor in actors]       # "pid P, node N", answered before the first shard
    queue, idle, lost = ShardQueue(todo, summary), list(range(count)), ""
    pending: dict[Any, tuple[int, Shard | None]] = {}         # a shard running, or None: the actor restarting
    try:
        while True:
            while idle and queue:
                slot, shard = idle.pop(), queue.pop()
                pending[actors[slot].run.remote(shard)] = (slot, shard)
            if not (any(s is not None for _, s in pending.values()) or (queue and pending)):
                break
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            slot, shard = pending.pop(ref)
            try:
                value = ray.get(ref)
            except RayError as exc:
                if shard is None or getattr(exc, "actor_init_failed", False):      # Ray cannot (re)start it
                    lost = actor_error(exc)
                    tell(f"worker {slot} could not be started or brought back; it leaves the pool [Ray: {lost}]")
                    if shard is not None:
                        queue.put_back(shard)
                    continue
                attempt = queue.attempt(shard)
                if isinstance(exc, RayActorError):
                    next_step = queue.failed(shard, f"worker died: {first_line(exc)}")
                    tell(f"worker {slot} ({answer(names[slot], 'identity unknown')}) died while encoding shard "
                         f"{shard.id} ({len(shard.utterances)} utterances), {attempt}; Ray restarts it and "
                         f"{next_step} [Ray: {first_line(exc)}]")
                    names[slot] = actors[slot].where.options(max_task_retries=-1).remote()   # retried till it is up
                    pending[names[slot]] = (slot, None)
                    continue
                queue.failed(shard, f"{type(exc).__name__}: {exc}")
                tell(f"shard {shard.id} failed on worker {slot}, {attempt}: {first_line(exc)}")
            else:
                if shard is not None:
                    record(value)
                    if queue.retried(shard) and value.elsewhere is None:
                        tell(f"shard {shard.id} committed on {queue.attempt(shard)} by worker {slot} "
                             f"({worker_label(value.pid, value.node)})")
            idle.append(slot)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    if queue:
        raise ExtractError(f"no worker left to run {len(queue)} shards: Ray could not start or bring them back; "
                           f"last: {lost}")


def _await_others(waiting: list[Shard], elsewhere: set[str], run: Callable[[list[Shard]], None], url: str,
                  storage_options: dict | None, summary: ExtractSummary, bar: Any) -> None:
    """Wait for the shards other writers hold (a concurrent run of the same plan, a retried job): each ends
    committed by them (counted in `summary.concurrent`), or is taken over and run here once its claim is released
    or stale (its writer died)."""
    while waiting:
        bar.set_postfix_str(f"waiting for {len(waiting)} shards other writers hold")
        time.sleep(CLAIM_POLL_SECONDS)
        done, todo, _ = store_state(waiting, url, storage_options)
        finished = [s for s in waiting if s.id in done]
        summary.concurrent += sum(s.rows for s in finished)
        summary.shards_concurrent += len(finished)
        bar.update(sum(s.rows for s in finished))
        free = [s for s in todo if holder_of(url, storage_options, s.id) is None]
        elsewhere.clear()
        run(free)
        held = {s.id for s in todo} - {s.id for s in free} | elsewhere
        waiting = [s for s in todo if s.id in held]

