"""Patterns over a device's history: daily summaries, frequent places, home and
work, and heatmaps.

Days are local calendar days of an IANA time zone, so a day may last 23 or 25
hours. Distance is split between days where a step crosses midnight, in
proportion to time, so a trip across midnight counts on both days with its part.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass

import h3
import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from tracking_grpc.activity.geodesy import EARTH_RADIUS_M
from tracking_grpc.activity.segments import Stop, Trip
from tracking_grpc.activity.track import Analysis

NIGHT_HOURS = (22, 6)  # home: dwell between 22:00 and 06:00 local
WORK_HOURS = (9, 17)  # work: dwell between 09:00 and 17:00 local, Monday to Friday


@dataclass(frozen=True, slots=True)
class Day:
    date: str
    start_ms: int
    end_ms: int
    distance_m: float
    moving_s: float
    stopped_s: float
    trip_count: int
    max_speed_mps: float
    fix_count: int
    first_fix_ms: int
    last_fix_ms: int


def local_days(
    start_ms: int, end_ms: int, time_zone: str
) -> tuple[list[str], np.ndarray]:
    """Local dates touching [start_ms, end_ms) and their midnights (len + 1) in ms."""
    zone = zoneinfo.ZoneInfo(time_zone)
    first = dt.datetime.fromtimestamp(start_ms / 1000, zone).date()
    last = dt.datetime.fromtimestamp((end_ms - 1) / 1000, zone).date()
    count = (last - first).days + 1
    dates = [first + dt.timedelta(days=k) for k in range(count + 1)]
    midnights = np.array(
        [
            int(dt.datetime(d.year, d.month, d.day, tzinfo=zone).timestamp() * 1000)
            for d in dates
        ],
        dtype=np.int64,
    )
    return [d.isoformat() for d in dates[:-1]], midnights


def _overlap_s(starts, ends, lo, hi) -> np.ndarray:
    """Seconds of each interval (rows) inside each window (columns)."""
    s = np.maximum(starts[:, None], lo[None, :])
    e = np.minimum(ends[:, None], hi[None, :])
    return np.clip(e - s, 0, None) / 1000.0


def daily_summary(
    a: Analysis,
    trips: list[Trip],
    stops: list[Stop],
    start_ms: int,
    end_ms: int,
    time_zone: str,
) -> list[Day]:
    """One summary per local day of one device's analysed history; its top speed
    is the cleaned track's, as a trip's is (a step may exceed ``max_speed_mps`` by
    the jump filter's slack)."""
    dates, midnights = local_days(start_ms, end_ms, time_zone)
    lo, hi = midnights[:-1], midnights[1:]
    rows = np.flatnonzero(a.trusted)
    t = a.fixes.time_ms[rows]
    if rows.size:
        cumulative = np.cumsum(a.counted_m[rows])
        at_midnight = np.interp(midnights, t, cumulative)
        distance = np.diff(at_midnight)
    else:
        distance = np.zeros(len(dates))

    trip_s = np.array([x.start.time_ms for x in trips], dtype=np.int64)
    trip_e = np.array([x.end.time_ms for x in trips], dtype=np.int64)
    moving = _overlap_s(trip_s, trip_e, lo, hi)
    stop_s = np.array([x.start_ms for x in stops], dtype=np.int64)
    stop_e = np.array([x.end_ms for x in stops], dtype=np.int64)
    stopped = _overlap_s(stop_s, stop_e, lo, hi)
    touching = (trip_s[:, None] < hi[None, :]) & (trip_e[:, None] >= lo[None, :])

    all_t = a.fixes.time_ms
    day_of_fix = np.searchsorted(midnights, all_t, side="right") - 1
    inside = (day_of_fix >= 0) & (day_of_fix < len(dates))
    counts = np.bincount(day_of_fix[inside], minlength=len(dates))
    speed = np.where(a.in_stop, np.nan, a.steps.speed_mps)
    out = []
    for k, date in enumerate(dates):
        mine = inside & (day_of_fix == k)
        fix_times = all_t[mine]
        top = speed[mine & a.trusted]
        top = top[np.isfinite(top)]
        out.append(
            Day(
                date=date,
                start_ms=int(lo[k]),
                end_ms=int(hi[k]),
                distance_m=float(distance[k]),
                moving_s=float(moving[:, k].sum()),
                stopped_s=float(stopped[:, k].sum()),
                trip_count=int(touching[:, k].sum()),
                max_speed_mps=float(top.max()) if top.size else 0.0,
                fix_count=int(counts[k]),
                first_fix_ms=int(fix_times.min()) if fix_times.size else 0,
                last_fix_ms=int(fix_times.max()) if fix_times.size else 0,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class Place:
    lat: float
    lon: float
    visit_count: int
    total_dwell_s: float
    first_visit_ms: int
    last_visit_ms: int
    stops: tuple[int, ...]  # indexes of its stops in the input list


def frequent_places(stops: list[Stop], radius_m: float) -> list[Place]:
    """Stops clustered so that every two stops of a place lie within radius_m."""
    if not stops:
        return []
    lat = np.array([s.lat for s in stops])
    lon = np.array([s.lon for s in stops])
    dwell = np.array([s.duration_s for s in stops])
    scale = np.deg2rad(1.0) * EARTH_RADIUS_M
    xy = np.column_stack(
        [
            ((lon - lon[0] + 180.0) % 360.0 - 180.0)
            * scale
            * np.cos(np.deg2rad(lat[0])),
            (lat - lat[0]) * scale,
        ]
    )
    if len(stops) == 1:
        labels = np.ones(1, dtype=int)
    else:
        labels = fcluster(
            linkage(xy, method="complete"), t=radius_m, criterion="distance"
        )
    places = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        weight = np.maximum(dwell[members], 1.0)
        places.append(
            Place(
                lat=float(np.average(lat[members], weights=weight)),
                lon=float(np.average(lon[members], weights=weight)),
                visit_count=int(members.size),
                total_dwell_s=float(dwell[members].sum()),
                first_visit_ms=int(min(stops[i].start_ms for i in members)),
                last_visit_ms=int(max(stops[i].end_ms for i in members)),
                stops=tuple(int(i) for i in members),
            )
        )
    places.sort(key=lambda p: (-p.total_dwell_s, -p.visit_count))
    return places


def _windows(
    start_ms, end_ms, time_zone, hours, weekdays_only
) -> tuple[np.ndarray, np.ndarray]:
    """Local-time windows (e.g. every night 22-06) overlapping the range."""
    zone = zoneinfo.ZoneInfo(time_zone)
    first = dt.datetime.fromtimestamp(start_ms / 1000, zone).date() - dt.timedelta(
        days=1
    )
    last = dt.datetime.fromtimestamp(end_ms / 1000, zone).date()
    lo, hi = [], []
    day = first
    begin, finish = hours
    while day <= last:
        if not weekdays_only or day.weekday() < 5:
            a = dt.datetime(day.year, day.month, day.day, begin, tzinfo=zone)
            end_day = day + dt.timedelta(days=1) if finish <= begin else day
            b = dt.datetime(
                end_day.year, end_day.month, end_day.day, finish, tzinfo=zone
            )
            lo.append(int(a.timestamp() * 1000))
            hi.append(int(b.timestamp() * 1000))
        day += dt.timedelta(days=1)
    return np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)


def home_and_work(
    stops: list[Stop], places: list[Place], start_ms: int, end_ms: int, time_zone: str
) -> tuple[tuple[Place, float] | None, tuple[Place, float] | None]:
    """The place with most night dwell, and another with most weekday-hours dwell."""
    if not places:
        return None, None
    s = np.array([x.start_ms for x in stops], dtype=np.int64)
    e = np.array([x.end_ms for x in stops], dtype=np.int64)
    night = _overlap_s(s, e, *_windows(start_ms, end_ms, time_zone, NIGHT_HOURS, False))
    work = _overlap_s(s, e, *_windows(start_ms, end_ms, time_zone, WORK_HOURS, True))
    night_by_stop, work_by_stop = night.sum(axis=1), work.sum(axis=1)
    night_dwell = np.array([night_by_stop[list(p.stops)].sum() for p in places])
    work_dwell = np.array([work_by_stop[list(p.stops)].sum() for p in places])
    home = None
    if night_dwell.max() > 0:
        h = int(np.argmax(night_dwell))
        home = (places[h], float(night_dwell[h]))
        work_dwell[h] = 0.0
    job = None
    if work_dwell.max() > 0:
        w = int(np.argmax(work_dwell))
        job = (places[w], float(work_dwell[w]))
    return home, job


def heatmap(lat: np.ndarray, lon: np.ndarray, resolution: int) -> list[tuple[str, int]]:
    """Fix counts per H3 cell, most first.

    h3 indexes one point per call, so points are first merged on a grid much finer
    than the cell (a hundredth of the cell edge) and each distinct grid point is
    indexed once; a parked device's thousands of fixes cost one call.
    """
    if lat.size == 0:
        return []
    edge_deg = h3.average_hexagon_edge_length(resolution, unit="m") / 111_195.0
    step = edge_deg / 100.0
    grid = np.column_stack([np.round(lat / step), np.round(lon / step)]).astype(
        np.int64
    )
    unique, inverse, counts = np.unique(
        grid, axis=0, return_inverse=True, return_counts=True
    )
    first = np.zeros(unique.shape[0], dtype=np.intp)
    first[inverse[::-1]] = np.arange(lat.size)[::-1]
    cells = [
        h3.latlng_to_cell(float(lat[i]), float(lon[i]), resolution)
        for i in first.tolist()
    ]
    totals: dict[str, int] = {}
    for cell, count in zip(cells, counts.tolist(), strict=True):
        totals[cell] = totals.get(cell, 0) + count
    return sorted(totals.items(), key=lambda item: (-item[1], item[0]))


def cell_center(cell: str) -> tuple[float, float]:
    lat, lon = h3.cell_to_latlng(cell)
    return float(lat), float(lon)
