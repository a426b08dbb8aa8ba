"""One pass over fixes of many devices: trust, steps, stops, motion, distances.

:func:`analyse` is shared by history queries (``complete=True``: the data ends
here) and by the live processor (``complete=False``: later fixes may still change
the newest rows, which are then not *final*).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracking_grpc.activity.clean import Steps, derive_steps, mark_outliers
from tracking_grpc.activity.geodesy import local_xy
from tracking_grpc.activity.groups import Groups
from tracking_grpc.activity.motion import classify, window_speed_mps
from tracking_grpc.activity.params import ActivityParams
from tracking_grpc.activity.stops import detect_stops
from tracking_grpc.core.fixes import FixBatch


@dataclass(frozen=True, slots=True)
class Analysis:
    fixes: FixBatch  # sorted by device, then time
    groups: Groups
    trusted: np.ndarray
    pending: np.ndarray
    final: np.ndarray  # trusted rows whose activity will not change
    open_region: np.ndarray  # rows a later fix may still join into a stop window
    steps: Steps
    in_stop: np.ndarray
    stop_id: np.ndarray
    gap: np.ndarray  # the step to this row crosses a silence that splits a trip
    counted_m: np.ndarray  # distance this row adds to the odometer
    window_speed_mps: np.ndarray
    motion: np.ndarray  # raw motion class per row (see motion.settle)


def analyse(
    fixes: FixBatch,
    params: ActivityParams,
    complete: bool,
    device_key: np.ndarray | None = None,
) -> Analysis:
    """Activity of fixes sorted by device, then fix time (one tenant).

    ``device_key`` may give an integer per row that is equal exactly where the
    device is (faster to compare than the id strings).
    """
    groups = Groups.of(fixes.device if device_key is None else device_key)
    trust = mark_outliers(
        fixes.time_ms, fixes.lat, fixes.lon, fixes.accuracy_m, groups, params, complete
    )
    trusted = trust.trusted
    rows = np.flatnonzero(trusted)
    sub = Groups.of(groups.index[rows])
    t = fixes.time_ms[rows]
    lat, lon = fixes.lat[rows], fixes.lon[rows]
    x, y = local_xy(lat, lon, sub)
    flags = detect_stops(
        t, x, y, sub, params.stop_radius_m, params.min_stop_s, complete
    )
    n = len(fixes)
    in_stop = np.zeros(n, dtype=bool)
    stop_id = np.full(n, -1, dtype=np.int64)
    final = np.zeros(n, dtype=bool)
    in_stop[rows] = flags.in_stop
    stop_id[rows] = flags.stop_id
    final[rows] = flags.final
    open_region = np.zeros(n, dtype=bool)
    open_region[rows] = flags.open_region

    steps = derive_steps(
        fixes.time_ms,
        fixes.lat,
        fixes.lon,
        fixes.speed_mps,
        trusted,
        groups,
        params,
    )
    has_prev = steps.prev >= 0
    prev = np.where(has_prev, steps.prev, 0)
    same_stop = has_prev & in_stop & in_stop[prev] & (stop_id == stop_id[prev])
    gap = has_prev & (steps.dt_s > params.max_gap_s) & ~same_stop
    counted = np.where(has_prev & ~same_stop & ~gap & ~steps.jump, steps.dist_m, 0.0)

    speed_w = np.full(n, np.nan)
    speed_w[rows] = window_speed_mps(t, lat, lon, sub, params.motion_window_s)
    speed_for_motion = np.where(np.isfinite(speed_w), speed_w, steps.speed_mps)
    motion = classify(speed_for_motion, in_stop, params)
    return Analysis(
        fixes,
        groups,
        trusted,
        trust.pending,
        final,
        open_region,
        steps,
        in_stop,
        stop_id,
        gap,
        counted,
        speed_w,
        motion,
    )
