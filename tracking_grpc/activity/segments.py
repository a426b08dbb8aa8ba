"""Trips and stops of a finished stretch of history, with their statistics.

A trip is what lies between two stops: it starts at the last fix of one stop and
ends at the first fix of the next. A silence longer than ``max_gap_s`` while away
from a stop ends a trip at the last fix before it; the next trip starts at the
first fix after it, so the unknown stretch is never counted. Movements shorter
than ``min_trip_distance_m`` or ``min_trip_s`` are not trips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracking_grpc.activity.geodesy import distance_m
from tracking_grpc.activity.groups import Groups
from tracking_grpc.activity.params import ActivityParams
from tracking_grpc.activity.track import Analysis


@dataclass(frozen=True, slots=True)
class Place:
    time_ms: int
    lat: float
    lon: float
    seq: int


@dataclass(frozen=True, slots=True)
class Trip:
    device: str
    start: Place
    end: Place
    distance_m: float
    max_speed_mps: float
    fix_count: int

    @property
    def duration_s(self) -> float:
        return (self.end.time_ms - self.start.time_ms) / 1000.0

    @property
    def avg_speed_mps(self) -> float:
        return self.distance_m / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Stop:
    device: str
    start_ms: int
    end_ms: int
    lat: float  # centre: the median of its fixes
    lon: float
    radius_m: float  # furthest fix from the centre
    fix_count: int

    @property
    def duration_s(self) -> float:
        return (self.end_ms - self.start_ms) / 1000.0


def _place(a: Analysis, row: int) -> Place:
    f = a.fixes
    return Place(
        int(f.time_ms[row]), float(f.lat[row]), float(f.lon[row]), int(f.seq[row])
    )


def trips(a: Analysis, params: ActivityParams) -> list[Trip]:
    """Trips of every device in the analysis, by device then time."""
    rows = np.flatnonzero(a.trusted)
    if rows.size == 0:
        return []
    sub = Groups.of(a.groups.index[rows])
    moving = ~a.in_stop[rows]
    gap = a.gap[rows]
    # Rows that begin a new stretch: device change, stop change or a gap.
    begin = sub.first.copy()
    begin[1:] |= moving[1:] != moving[:-1]
    begin |= gap
    starts = np.flatnonzero(begin & moving)
    stretch = np.cumsum(begin)
    last = np.flatnonzero(np.append(stretch[1:] != stretch[:-1], True))
    ends = last[stretch[starts] - 1]  # last row of each moving stretch
    # Extend to the departure and arrival fixes of the neighbouring stops.
    first_rows = np.where(~sub.first[starts] & ~gap[starts], starts - 1, starts)
    after = ends + 1
    arrive = (after < rows.size) & ~np.append(sub.first, True)[after]
    arrive &= ~np.append(gap, True)[after]
    last_rows = np.where(arrive, after, ends)

    cum = np.cumsum(a.counted_m[rows])
    dist = cum[last_rows] - cum[first_rows]
    speed = np.where(moving, a.steps.speed_mps[rows], np.nan)
    # The cleaned track's speeds as they are: a trusted step may beat max_speed_mps
    # by the jump filter's slack, and the trip's top speed says so too.
    speed = np.where(np.isfinite(speed), speed, -1.0)
    out: list[Trip] = []
    for k in range(starts.size):
        s, e = int(first_rows[k]), int(last_rows[k])
        seg_speed = speed[starts[k] : ends[k] + 1]
        peak = float(seg_speed.max()) if seg_speed.size else -1.0
        trip = Trip(
            device=str(a.fixes.device[rows[s]]),
            start=_place(a, int(rows[s])),
            end=_place(a, int(rows[e])),
            distance_m=float(dist[k]),
            max_speed_mps=max(peak, 0.0),
            fix_count=e - s + 1,
        )
        if trip.distance_m >= params.min_trip_distance_m and (
            trip.duration_s >= params.min_trip_s
        ):
            out.append(trip)
    return out


def stops(a: Analysis) -> list[Stop]:
    """Stops of every device in the analysis, by device then time."""
    rows = np.flatnonzero(a.trusted & a.in_stop)
    if rows.size == 0:
        return []
    key = a.stop_id[rows]
    change = np.append(True, key[1:] != key[:-1])
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], rows.size)
    f = a.fixes
    out = []
    for s, e in zip(starts, ends, strict=True):
        r = rows[s:e]
        lat, lon = float(np.median(f.lat[r])), float(np.median(f.lon[r]))
        spread = distance_m(
            np.full(r.size, lat), np.full(r.size, lon), f.lat[r], f.lon[r]
        )
        out.append(
            Stop(
                device=str(f.device[r[0]]),
                start_ms=int(f.time_ms[r[0]]),
                end_ms=int(f.time_ms[r[-1]]),
                lat=lat,
                lon=lon,
                radius_m=float(spread.max()),
                fix_count=int(r.size),
            )
        )
    return out
