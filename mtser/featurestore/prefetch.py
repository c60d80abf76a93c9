"""The one background prefetch helper: `load(item)` for each item, computed ahead in threads while the caller works.

Used by the trainer's batch reading (`trainer.data`, several threads, a few batches ahead) and by extraction's
audio decoding (one thread, one group ahead: `prefetch(load, groups, depth=1, workers=1)`). Threads only: no torch,
so the feature store may use it.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(load: Callable[[T], R], items: Iterable[T], depth: int = 4, workers: int = 2) -> Iterator[R]:
    """Yield load(item) for every item, in order, computed by `workers` background threads up to `depth` ahead.

    With depth=1 (and one worker) the next item loads while the caller works on the current one. An exception in
    `load` is raised at its item. Stopping early (break / close) cancels what is still queued.
    """
    pending: deque[Future] = deque()
    items = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mtser-prefetch") as pool:
        try:
            for item in items:
                pending.append(pool.submit(load, item))
                if len(pending) > max(1, depth):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
