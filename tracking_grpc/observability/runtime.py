"""The interpreter's own stalls, as metrics: garbage-collector pauses and event-loop
lag.

Every open stream keeps a pending read (a few dozen small objects) that lives until
its next message, so a server with 10,000 streams holds hundreds of thousands of
young objects: how often the collector runs decides how long each of its passes
stops the event loop (see ``server.tune_gc``). These two histograms show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

from tracking_grpc.observability import metrics

LAG_SAMPLE_S = 0.1  # how often the loop is checked; each check costs a few µs


class RuntimeMonitor:
    """Records each collection's pause and samples the event loop's lag.

    The collector's callback only notes the pause: a callback that took a metric's
    lock could wait forever on a lock its own thread held when the collection
    started (prometheus_client's multiprocess values share one). The lag sampler,
    on the event loop, moves the noted pauses into the histogram.
    """

    def __init__(self, lag_sample_s: float = LAG_SAMPLE_S) -> None:
        self.lag_sample_s = lag_sample_s
        self._gc_started = 0.0
        self._pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._lag_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin recording (call from the running event loop)."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        if self._lag_task is None:
            self._lag_task = asyncio.create_task(self._sample_lag(), name="loop-lag")

    async def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
            self._lag_task = None
        self._record_pauses()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_started
            self._pauses.append((info["generation"], pause))

    def _record_pauses(self) -> None:
        pauses, self._pauses = self._pauses, []
        for generation, seconds in pauses:
            metrics.gc_paused(generation, seconds)

    async def _sample_lag(self) -> None:
        """How late a timer fires: the time the loop was busy with other work."""
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.lag_sample_s)
            late = time.perf_counter() - started - self.lag_sample_s
            metrics.loop_lagged(max(late, 0.0))
            self._record_pauses()
