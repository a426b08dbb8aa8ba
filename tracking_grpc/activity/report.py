"""Trips and stops of a recorded trace as text lines (``tracking trips FILE``)."""

from __future__ import annotations

import datetime as dt

from tracking_grpc.activity import segments
from tracking_grpc.activity.params import ActivityParams
from tracking_grpc.activity.track import analyse
from tracking_grpc.core.fixes import FixBatch


def _when(time_ms: int) -> str:
    return dt.datetime.fromtimestamp(time_ms / 1000, dt.UTC).strftime(
        "%Y-%m-%d %H:%M:%S"
    )


def describe(fixes: FixBatch, params: ActivityParams) -> list[str]:
    """One line per trip and stop, by device then time, then a total line."""
    a = analyse(fixes.sorted_by_device_time(), params, complete=True)
    rows = [
        (t.device, t.start.time_ms, "trip", t.end.time_ms,
         f"{t.distance_m / 1000:8.2f} km  avg {t.avg_speed_mps * 3.6:5.1f} km/h  "
         f"max {t.max_speed_mps * 3.6:5.1f} km/h")
        for t in segments.trips(a, params)
    ] + [
        (s.device, s.start_ms, "stop", s.end_ms,
         f"at {s.lat:.5f},{s.lon:.5f}  radius {s.radius_m:5.1f} m")
        for s in segments.stops(a)
    ]  # fmt: skip
    rows.sort()
    lines = [
        f"{device:>12}  {kind}  {_when(start)} - {_when(end)}  "
        f"{(end - start) / 60_000:6.1f} min  {detail}"
        for device, start, kind, end, detail in rows
    ]
    outliers = int((~a.trusted).sum())
    lines.append(
        f"{len(fixes)} fixes, {outliers} not trusted, "
        f"{a.counted_m.sum() / 1000:.2f} km counted"
    )
    return lines
