"""Timing helper the bench scripts share."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def alternated(runners: Sequence[Callable[[], object]], rounds: int) -> list[float]:
    """Median seconds of each runner, the runners alternated round by round so drift and load hit all alike."""
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(rounds):
        for runner, t in zip(runners, times):
            start = time.perf_counter()
            runner()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
