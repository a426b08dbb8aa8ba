"""Time a device spent inside each geofence, from its trusted fixes.

Between two consecutive fixes that are both inside a fence the whole interval
counts; where only one of them is inside, half of it (the crossing lies somewhere
between). Silences longer than ``max_gap_s`` count nothing: where the device was
then is unknown. Fence schedules are not applied: this is where the device was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracking_grpc.geofence.index import FenceIndex


@dataclass(frozen=True, slots=True)
class FenceTime:
    fence_id: str
    inside_s: float
    visit_count: int
    first_inside_ms: int
    last_inside_ms: int


def time_in_fences(
    index: FenceIndex,
    time_ms: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    max_gap_s: float,
) -> list[FenceTime]:
    """Fences the track entered, most time inside first (one device, by time)."""
    n = time_ms.shape[0]
    point, row = index.contains(lon, lat)
    if point.size == 0:
        return []
    dt_ms = np.zeros(n, dtype=np.int64)
    dt_ms[:-1] = np.diff(time_ms)
    dt_ms[dt_ms > max_gap_s * 1000] = 0  # step from fix p to p + 1
    key = row.astype(np.int64) * (n + 1) + point
    next_inside = np.isin(key + 1, key)
    prev_inside = np.isin(key - 1, key) & (point > 0)
    after = np.where(next_inside, dt_ms[point], dt_ms[point] / 2.0)
    before = np.where(prev_inside | (point == 0), 0.0, dt_ms[point - 1] / 2.0)
    fences = len(index)
    inside_ms = np.bincount(row, weights=after + before, minlength=fences)
    visits = np.bincount(row[~prev_inside], minlength=fences)
    first = np.full(fences, np.iinfo(np.int64).max)
    np.minimum.at(first, row, time_ms[point])
    last = np.full(fences, -1)
    np.maximum.at(last, row, time_ms[point])
    found = np.flatnonzero(visits > 0)
    out = [
        FenceTime(
            fence_id=str(index.ids[r]),
            inside_s=float(inside_ms[r]) / 1000.0,
            visit_count=int(visits[r]),
            first_inside_ms=int(first[r]),
            last_inside_ms=int(last[r]),
        )
        for r in found.tolist()
    ]
    out.sort(key=lambda f: (-f.inside_s, f.fence_id))
    return out
