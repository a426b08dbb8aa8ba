"""Motion state: stopped, walking, cycling or driving, from speed and its history.

The speed is the displacement over the last ``motion_window_s`` (so jitter at rest
does not look like movement), or the reported speed when the device is in motion
and reports one. A fix inside a stop is always stopped. A new state is taken only
once it has lasted ``motion_min_s``; shorter changes keep the previous state.
"""

from __future__ import annotations

import enum

import numpy as np

from tracking_grpc.activity.geodesy import distance_m
from tracking_grpc.activity.groups import Groups, forward_fill, runs
from tracking_grpc.activity.params import ActivityParams


class Motion(enum.IntEnum):
    UNKNOWN = 0
    STOPPED = 1
    WALKING = 2
    CYCLING = 3
    DRIVING = 4


def window_speed_mps(time_ms, lat, lon, groups: Groups, window_s: float) -> np.ndarray:
    """Displacement speed from the newest fix at least window_s older; NaN if none."""
    n = time_ms.shape[0]
    speed = np.full(n, np.nan)
    if n == 0:
        return speed
    # Search within each device by offsetting times per group.
    span = int(time_ms.max() - time_ms.min()) + int(window_s * 1000) + 1
    key = time_ms - time_ms.min() + groups.index.astype(np.int64) * span
    target = key - int(window_s * 1000)
    back = np.searchsorted(key, target, side="right") - 1
    ok = back >= groups.row_start()
    i = np.flatnonzero(ok)
    j = back[i]
    dt_s = (time_ms[i] - time_ms[j]) / 1000.0
    speed[i] = distance_m(lat[j], lon[j], lat[i], lon[i]) / dt_s
    return speed


def classify(speed_mps: np.ndarray, in_stop: np.ndarray, params: ActivityParams):
    """Raw motion class per fix."""
    state = np.select(
        [
            ~np.isfinite(speed_mps),
            speed_mps < params.walking_mps,
            speed_mps < params.cycling_mps,
            speed_mps < params.driving_mps,
        ],
        [Motion.UNKNOWN, Motion.STOPPED, Motion.WALKING, Motion.CYCLING],
        Motion.DRIVING,
    ).astype(np.int8)
    state[in_stop] = Motion.STOPPED
    return state


def settle(
    raw: np.ndarray,
    time_ms: np.ndarray,
    groups: Groups,
    min_s: float,
    initial: np.ndarray,
) -> np.ndarray:
    """Motion state per fix: a class counts once it has lasted min_s.

    ``initial`` is each group's state before its first row (UNKNOWN for none).
    """
    n = raw.shape[0]
    if n == 0:
        return raw
    starts, ends = runs(raw, groups)
    lasted = time_ms[ends - 1] - time_ms[starts] >= min_s * 1000.0
    known = raw[starts] != Motion.UNKNOWN
    # A run becomes the state from the fix at which it has lasted min_s.
    deadline = time_ms[starts] + min_s * 1000.0
    run_of_row = np.repeat(np.arange(starts.size), ends - starts)
    settled_row = (time_ms >= deadline[run_of_row]) & (lasted & known)[run_of_row]
    settled = forward_fill(raw, settled_row, groups, Motion.UNKNOWN)
    before = ~(
        np.maximum.accumulate(np.where(settled_row, np.arange(n), -1))
        >= groups.row_start()
    )
    settled[before] = initial[groups.index[before]]
    return settled
