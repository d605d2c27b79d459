"""The garbage collector in a worker: keep its pauses short, and time every one of them.

A fan-out server's latency is decided by its longest pauses. A full (generation 2) collection
walks every tracked object, and a worker with thousands of connections holds a few dozen per
connection: at 10,000 connections full collections took 100-200 ms (docs/performance.md).
Those objects live as long as their connection and are freed by reference counting (closing a
connection leaves no cycles; tests/test_worker.py checks it), so the worker moves what has
survived into the permanent generation every FREEZE_INTERVAL seconds (``gc.freeze()``), where
no collection walks it again. Young objects are collected as usual first, so only cyclic garbage
that already reached the oldest generation could be kept by a freeze.

Between two freezes, a burst of new connections would still make CPython run full collections
(it does when the oldest generation grew by a quarter), each walking every connection that came
in the burst: ~150 ms at 5,000 connections. So automatic full collections are turned off
(FULL_COLLECTION_THRESHOLD); the young generations are collected as usual, and what survives
them is frozen.

/healthz shows the pause figures, so that a pause can be seen before it is felt.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from typing import Any

import trio

# How many recent pauses are kept for the percentile (bounded: a worker runs for months).
RECENT_PAUSES = 1000

# Seconds between two freezes of what has survived; new connections wait at most this long
# before their objects stop costing full collections anything.
FREEZE_INTERVAL = 5.0


# The third threshold of gc.set_threshold: how many generation-1 collections make a full one.
# Large enough that it never happens on its own; gc.collect() still works when called.
FULL_COLLECTION_THRESHOLD = 1_000_000_000


def keep_pauses_short() -> None:
    """Freeze what start-up made and stop automatic full collections (see the module's doc)."""
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, FULL_COLLECTION_THRESHOLD)
    gc.freeze()


async def freeze_survivors_forever() -> None:
    """Every FREEZE_INTERVAL: collect the young generations, then freeze what survived."""
    while True:
        await trio.sleep(FREEZE_INTERVAL)
        gc.collect(1)
        gc.freeze()


class GcPauses:
    """Times every collection while installed (one per process): the wall-clock pause, and the
    CPU the collector itself used (on a shared machine the first includes time the process
    was not scheduled at all)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.longest_ms = 0.0
        self.total_ms = 0.0  # every pause added up, for the metrics (a counter)
        self.longest_cpu_ms = 0.0
        self.recent_ms: deque[float] = deque(maxlen=RECENT_PAUSES)
        self._started = 0.0
        self._started_cpu = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            self._started_cpu = time.thread_time()
            return
        pause_ms = (time.perf_counter() - self._started) * 1000
        cpu_ms = (time.thread_time() - self._started_cpu) * 1000
        self.collections[info["generation"]] += 1
        self.recent_ms.append(pause_ms)
        self.total_ms += pause_ms
        self.longest_ms = max(self.longest_ms, pause_ms)
        self.longest_cpu_ms = max(self.longest_cpu_ms, cpu_ms)

    def install(self) -> None:
        gc.callbacks.append(self._callback)

    def summary(self) -> dict[str, Any]:
        recent = sorted(self.recent_ms)
        p99 = recent[min(len(recent) - 1, int(len(recent) * 0.99))] if recent else 0.0
        return {
            "collections": self.collections,
            "longest_pause_ms": round(self.longest_ms, 3),
            "longest_pause_cpu_ms": round(self.longest_cpu_ms, 3),
            "p99_pause_ms": round(p99, 3),
        }
