"""When each fix of a replayed trace is sent, and what time it is stamped with.

A trace of duration D replayed at speed N sends fix i at ``start + (t_i - t_0) / N``
(``--fast``: as soon as acks allow). Unless original times are kept, every fix time
is moved by one offset so that the trace plays as live and no fix is stamped after
it is sent:

* speed 1: ``offset = start - t_0``; every fix is stamped at its send time.
* speed N > 1: ``offset = start - t_0 - D (1 - 1/N)``; the last fix is stamped when
  it is sent and the spacing between fixes is kept.
* fast: ``offset = start - t_0 - D``; the last fix is stamped at the start.

>>> Pace(speed=2.0).offset_ms(start_ms=10_000, first_ms=0, duration_ms=4_000)
8000
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tracking_grpc.client.session import RetryPolicy
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.traces import Trace


@dataclass(frozen=True, slots=True)
class Pace:
    """How fast a trace is replayed: ``speed`` times real time, or ``fast``."""

    speed: float = 1.0
    fast: bool = False

    def __post_init__(self) -> None:
        if not (self.speed > 0 and np.isfinite(self.speed)):
            raise InvalidArgument("speed", "must be a positive number")

    def offset_ms(self, start_ms: int, first_ms: int, duration_ms: int) -> int:
        """Added to every fix time so that the trace plays as live (see module doc)."""
        slowdown = 1.0 if self.fast else max(0.0, 1.0 - 1.0 / self.speed)
        lag = duration_ms * slowdown
        # Rounding the lag up keeps every stamp at or before its (floored) send time.
        return int(start_ms - first_ms - math.ceil(lag))

    def due_ms(self, time_ms: np.ndarray, first_ms: int) -> np.ndarray:
        """Milliseconds after the start at which each fix is due (0 when fast)."""
        if self.fast:
            return np.zeros(time_ms.shape, dtype=np.int64)
        elapsed = (np.asarray(time_ms, dtype=np.int64) - first_ms) / self.speed
        return np.floor(elapsed).astype(np.int64)


def batch_bounds(due_ms: np.ndarray, tick_ms: int, max_fixes: int) -> np.ndarray:
    """Split fixes (sorted by due time) into batches; returns the start of each.

    Fixes due within the same ``tick_ms`` go out together, at most ``max_fixes``
    per batch. The batch ``k`` is ``[starts[k], starts[k + 1])`` (last: to the end).

    >>> batch_bounds(np.array([0, 0, 5, 40, 41, 41]), tick_ms=10, max_fixes=2).tolist()
    [0, 2, 3, 5]
    """
    n = due_ms.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.intp)
    if tick_ms < 1 or max_fixes < 1:
        raise InvalidArgument("batch", "tick_ms and max_fixes must be at least 1")
    tick = np.asarray(due_ms, dtype=np.int64) // tick_ms
    run_start = np.r_[True, tick[1:] != tick[:-1]]
    first_of_run = np.maximum.accumulate(np.where(run_start, np.arange(n), 0))
    full_chunk = (np.arange(n) - first_of_run) % max_fixes == 0
    return np.flatnonzero(run_start | full_chunk)


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How a trace is sent."""

    pace: Pace = field(default_factory=Pace)
    original_times: bool = False
    tick_ms: int = 20
    batch_fixes: int = 100
    window: int = 8
    want_events: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)


DEFAULT_OPTIONS = ReplayOptions()


def stamped_times(trace: Trace, options: ReplayOptions, start_ms: int) -> np.ndarray:
    """Fix times as sent: shifted to play as live, or as recorded."""
    if options.original_times or len(trace) == 0:
        return trace.time_ms
    offset = options.pace.offset_ms(
        start_ms, int(trace.time_ms[0]), trace.duration_ms()
    )
    return trace.time_ms + np.int64(offset)
