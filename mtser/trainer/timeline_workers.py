"""`mtser predict --timeline --workers N`: the timeline's per-file work in Ray actors, as extraction runs its shards.

Each actor (one GPU each where the cluster has GPUs, else CPU actors splitting the cores: `actors.actor_options`)
holds a `Timeline` (member models, encoders and VAD loaded once) and takes whole files from the driver one at a
time, so faster actors take more. The actor commits each file to the output folder (and its segment features to
the store) itself; the driver only gathers the results as they come. A worker process that dies is restarted by
Ray and its file run again, up to MAX_FILE_ATTEMPTS times; a file that kills its worker every time is reported
failed and the others go on.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from mtser.featurestore.config import TimelineConfig
from mtser.trainer.timeline import FileResult

MAX_FILE_ATTEMPTS = 3           # runs of one file whose worker keeps dying before it is reported failed


@dataclass(frozen=True)
class TimelineJob:
    """What every actor needs to build its Timeline and commit files."""

    ensemble: str
    cfg: TimelineConfig
    out: str
    skip_external: bool
    storage_options: dict | None
    store: str | None


class TimelineWorker:
    """A Ray actor: the job's Timeline, loaded once, then whatever files the driver hands it."""

    def __init__(self, job: TimelineJob, threads: int):
        import torch

        from mtser.trainer.predict import EnsembleScorer
        from mtser.trainer.timeline import Timeline, TimelineFolder

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scorer = EnsembleScorer(job.ensemble, device, job.skip_external, job.storage_options)
        self.timeline = Timeline(scorer, job.cfg, device, job.storage_options, store=job.store)
        self.folder = TimelineFolder(job.out, job.storage_options)

    def run(self, path: str) -> FileResult:
        return self.timeline.commit_file(path, self.folder)


def run_in_actors(paths: list[str], job: TimelineJob, workers: int, address: str | None,
                  done: Callable[[FileResult], None]) -> None:
    """Run and commit `paths` in up to `workers` actors (in the Ray cluster at `address`, Ray as the caller has it,
    or a local one); `done(result)` on the driver as each file finishes."""
    import ray
    from ray.exceptions import RayActorError

    from mtser.featurestore.actors import actor_options, first_line, ray_session

    with ray_session(address):
        count, threads, options = actor_options(workers, len(paths))
        # a death costs one restart; the bound keeps an actor that cannot start from restarting forever
        remote = ray.remote(TimelineWorker).options(max_restarts=MAX_FILE_ATTEMPTS * len(paths),
                                                    max_task_retries=MAX_FILE_ATTEMPTS - 1, **options)
        actors = [remote.remote(job, threads) for _ in range(count)]
        queue, inflight = deque(paths), {}
        try:
            for actor in actors[:len(queue)]:
                path = queue.popleft()
                inflight[actor.run.remote(path)] = (actor, path)
            while inflight:
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                actor, path = inflight.pop(ref)
                try:
                    done(ray.get(ref))
                except RayActorError as exc:
                    done(FileResult(path, "failed", f"its worker died {MAX_FILE_ATTEMPTS} times on it "
                                                    f"({first_line(exc)})"))
                if queue:
                    path = queue.popleft()
                    inflight[actor.run.remote(path)] = (actor, path)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
