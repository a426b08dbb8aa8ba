"""Replay of the Liverpool route 14 bus trace against fences at its termini and a stop.

The expected events are derived independently of the service: a plain loop per bus, in
fix-time order, with a haversine distance (sphere R = 6371008.8 m) for the circles and a
flat metre grid for the rectangle, applying the rules of docs/geofencing.md (fixes
carry no accuracy: enter when inside, exit when more than 5 m outside, DWELL once per
stay at the first fix at least dwell_ms after the enter). Fixes within 1.5 m of a
threshold would make the two distance models disagree; the test asserts there are none.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import UTC, datetime

import numpy as np
import pytest

from tests.conftest import TRACES, require_shared
from tests.geofence.support import NOW_MS, TENANT
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.geofence.detector import FenceDetector
from tracking_grpc.geofence.index import FenceIndex
from tracking_grpc.geofence.model import FenceSpec, ShapeSpec

TRACE = TRACES / "liverpool_bus_route14_outbound.csv"
R = 6_371_008.8
CIRCLES = {  # id: (lat, lon, radius_m, dwell_ms)
    "queen_square": (53.4078, -2.9825, 170.0, 120_000),
    "petherick_road": (53.4619, -2.8950, 140.0, 60_000),
}
STOP = ("stop_448", 53.4472, 53.4498, -2.9168, -2.9125, 30_000)  # id, S, N, W, E, dwell


def load_trace() -> list[tuple[str, int, float, float]]:
    """(bus, time_ms, lat, lon) rows in fix-time order."""
    with require_shared(TRACE).open() as handle:
        rows = [
            (
                r["vehicle_id"],
                int(
                    datetime.strptime(r["timestamp"], "%Y-%m-%d %H:%M:%S")
                    .replace(tzinfo=UTC)
                    .timestamp()
                    * 1000
                ),
                float(r["latitude"]),
                float(r["longitude"]),
            )
            for r in csv.DictReader(handle)
        ]
    return sorted(rows, key=lambda r: (r[1], r[0]))


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * R * math.asin(math.sqrt(a))


def outside_by_m(fence_id: str, lat: float, lon: float) -> float:
    """Distance outside the fence's edge in metres (negative or 0 inside)."""
    if fence_id in CIRCLES:
        clat, clon, radius, _ = CIRCLES[fence_id]
        return haversine_m(clat, clon, lat, lon) - radius
    _, south, north, west, east, _ = STOP
    dy = max(south - lat, 0.0, lat - north) * math.pi * R / 180
    dx = (
        max(west - lon, 0.0, lon - east)
        * math.pi
        * R
        / 180
        * math.cos(math.radians(lat))
    )
    inside = south <= lat <= north and west <= lon <= east
    return -1.0 if inside else math.hypot(dx, dy)


def expected_events(rows) -> list[tuple[str, str, str, int]]:
    """(bus, fence, type, time_ms) by the documented rules, one fix at a time."""
    dwell = {f: c[3] for f, c in CIRCLES.items()} | {STOP[0]: STOP[5]}
    entered: dict[tuple[str, str], tuple[int, bool]] = {}
    found = []
    for bus, time_ms, lat, lon in rows:
        for fence_id in dwell:
            d = outside_by_m(fence_id, lat, lon)
            assert min(abs(d), abs(d - 5.0)) > 1.5 or d < 0, (bus, time_ms, fence_id)
            key = (bus, fence_id)
            if key not in entered and d <= 0:
                entered[key] = (time_ms, False)
                found.append((bus, fence_id, "ENTER", time_ms))
            elif key in entered and d > 5.0:
                del entered[key]
                found.append((bus, fence_id, "EXIT", time_ms))
            elif key in entered and not entered[key][1]:
                since, _ = entered[key]
                if time_ms - since >= dwell[fence_id]:
                    entered[key] = (since, True)
                    found.append((bus, fence_id, "DWELL", time_ms))
    return found


def fences() -> list[FenceSpec]:
    specs = [
        FenceSpec(f, ShapeSpec.circle(lat, lon, r), dwell_ms=dwell)
        for f, (lat, lon, r, dwell) in CIRCLES.items()
    ]
    stop_id, s, n, w, e, dwell = STOP
    ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
    geometry = json.dumps({"type": "Polygon", "coordinates": [ring]})
    return [*specs, FenceSpec(stop_id, ShapeSpec.geojson(geometry), dwell_ms=dwell)]


@pytest.mark.parametrize("window_s", [60, 600], ids=["batches-1min", "batches-10min"])
def test_liverpool_replay_matches_independent_derivation(window_s: int) -> None:
    rows = load_trace()
    index, detector = FenceIndex.build(fences()), FenceDetector(TENANT)
    times = np.array([r[1] for r in rows])
    events = []
    for start in range(int(times[0]), int(times[-1]) + 1, window_s * 1000):
        chunk = [
            r
            for r, t in zip(rows, times, strict=True)
            if start <= t < start + window_s * 1000
        ]
        if chunk:
            bus, time_ms, lat, lon = zip(*chunk, strict=True)
            batch = FixBatch.from_columns(
                TENANT, bus, range(len(chunk)), time_ms, lat, lon
            )
            events += detector.evaluate(batch, index, NOW_MS)
    got = sorted((e.device, e.fence_id, e.type.name, e.time_ms) for e in events)
    expected = sorted(expected_events(rows))
    assert got == expected
    assert {k for _, _, k, _ in expected} == {"ENTER", "EXIT", "DWELL"}
