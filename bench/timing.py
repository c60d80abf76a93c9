"""Timing helper the bench scripts share."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def alternated(runners: Sequence[Callable[[], object]], rounds: int,
               before: Callable[[int], object] | None = None, warmup: bool = False) -> list[float]:
    """Median seconds of each runner, the runners alternated round by round so drift and load hit all alike.
    `before(i)`, untimed, precedes each run of runner i (e.g. evicting its files from the page cache). `warmup`:
    each runner runs once untimed first, so once-per-process costs (a GEMM's plan, the GEMM library timed at a new
    shape, `kernels.onednn_gemm_is_faster`) stay out of a steady-state figure."""
    for runner in runners if warmup else ():
        runner()
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(rounds):
        for i, (runner, t) in enumerate(zip(runners, times)):
            if before is not None:
                before(i)
            start = time.perf_counter()
            runner()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def alternated_wall_cpu(runners: Sequence[Callable[[], object]], rounds: int,
                        before: Callable[[int], object] | None = None) -> tuple[list[float], list[float]]:
    """`alternated`'s median wall seconds and the median CPU seconds of this process (all its threads) per runner:
    on a loaded shared machine the CPU time is the steadier figure."""
    cpu: list[list[float]] = [[] for _ in runners]

    def counted(runner: Callable[[], object], sink: list[float]) -> Callable[[], None]:
        def run() -> None:
            start = time.process_time()
            runner()
            sink.append(time.process_time() - start)
        return run

    wall = alternated([counted(r, c) for r, c in zip(runners, cpu)], rounds, before)
    return wall, [statistics.median(c) for c in cpu]
