"""Ray actors as mtser runs them (extraction's shards, the timeline's files): the session, each actor's resources,
and the driver's one-line messages about a worker (who it is, what Ray said). Imports Ray only inside functions.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


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


def workers_device(workers: int) -> str:
    """"cuda" where the workers get GPUs (this process's for workers=0, the Ray cluster's otherwise), else "cpu"."""
    if workers == 0:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    import ray

    return "cuda" if int(ray.cluster_resources().get("GPU", 0)) else "cpu"


def node_id() -> str | None:
    """This process's Ray node id, None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - node id is informational
        return None


def worker_label(pid: int, node: str | None) -> str:
    """A worker as the driver's lines name it: its pid and (short) Ray node id."""
    return f"pid {pid}" + (f", node {node[:8]}" if node else "")


def answer(ref: Any, default: str) -> str:
    """An actor call's answer if it has come (a dead worker's `where`), else `default`; never waits."""
    import ray

    try:
        return ray.get(ref, timeout=0)
    except Exception:  # noqa: BLE001 - informational only
        return default


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text, at most 200 characters (Ray's are paragraphs)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def actor_error(exc: BaseException) -> str:
    """Why an actor died, in one line: the exception its constructor raised (the last line of Ray's traceback), or
    Ray's first line for a process that died."""
    if getattr(exc, "actor_init_failed", False):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return lines[-1][:300]
    return first_line(exc)
