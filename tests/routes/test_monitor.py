"""Route monitoring on simulated drives: exactly the expected route events."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.routes import support
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import EventType
from tracking_grpc.routing.monitor import (
    MonitorSettings,
    PlannedRoute,
    RouteMonitor,
    deviation_m,
)

E = EventType
A, B = (60.1690, 24.9330), (60.1750, 24.9502)


@pytest.fixture(scope="module")
def out_and_back(car) -> PlannedRoute:
    """A planned loop: A to B, a U-turn at B, and back to A the same way."""
    out = car.route(np.array([A[0], B[0]]), np.array([A[1], B[1]]), steps=False)
    lat = np.r_[out.lat, out.lat[-2::-1]]
    lon = np.r_[out.lon, out.lon[-2::-1]]
    seconds = np.r_[out.segment_duration_s, out.segment_duration_s[::-1]]
    return PlannedRoute("t1", "car-1", "loop", lat, lon, seconds, support.START_MS)


def detour_by(
    route: PlannedRoute, points: np.ndarray, rows: np.ndarray, offset_m: float
) -> np.ndarray:
    """Move ``rows`` offset_m in the first direction where all of them end up
    between 0.9 and 1.1 times offset_m from the route (measured independently)."""
    for angle in np.radians(np.arange(0, 360, 15)):
        east, north = offset_m * np.cos(angle), offset_m * np.sin(angle)
        moved = support.shift(points, rows, east, north)
        off = [deviation_m(route.lat, route.lon, *moved[i]) for i in rows]
        if min(off) > 0.9 * offset_m and max(off) < 1.1 * offset_m:
            return moved
    raise AssertionError("no direction keeps the detour at that distance")


def detour(route: PlannedRoute, points: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Move ``rows`` in the first direction that takes them all well off the route."""
    for angle in np.radians(np.arange(0, 360, 30)):
        east, north = 250 * np.cos(angle), 250 * np.sin(angle)
        moved = support.shift(points, rows, east, north)
        if min(deviation_m(route.lat, route.lon, *moved[i]) for i in rows) > 100:
            return moved
    raise AssertionError("no direction leaves the route")


def run(route: PlannedRoute, points: np.ndarray, **fix_args) -> list[tuple[E, int]]:
    monitor = RouteMonitor(MonitorSettings())
    monitor.assign(route)
    events = monitor.evaluate(support.fixes("car-1", points, **fix_args), 0)
    return [(e.type, e.fix_seq) for e in events]


def test_detour_u_turn_and_walking_raise_exactly_the_expected_events(
    out_and_back,
) -> None:
    total = support.route_length_m(out_and_back.lat, out_and_back.lon)
    points, along = support.drive(
        out_and_back.lat, out_and_back.lon, 10.0, slow=(300, 450, 1.4)
    )
    rows = np.flatnonzero((along > total * 0.7) & (along < total * 0.7 + 400))
    points = detour(out_and_back, points, rows)
    events = [x for x in run(out_and_back, points) if x[0] != E.ETA_UPDATED]
    seq = rows + 1
    assert events == [
        (E.OFF_ROUTE, int(seq[2])),
        (E.BACK_ON_ROUTE, int(seq[-1] + 2)),
        (E.ARRIVED, 1 + int(np.argmax(total - along <= 40 + 8))),
    ]


@pytest.mark.parametrize(
    ("offset_m", "accuracy_m", "expected"),
    [
        pytest.param(70, 5, [E.OFF_ROUTE, E.BACK_ON_ROUTE], id="70m-accurate"),
        pytest.param(70, 30, [], id="70m-within-accuracy"),
        pytest.param(400, 300, [], id="far-but-vague"),
        pytest.param(40, 5, [], id="within-threshold"),
    ],
)
def test_off_route_allows_for_accuracy(
    out_and_back, offset_m, accuracy_m, expected
) -> None:
    points, along = support.drive(out_and_back.lat, out_and_back.lon, 10.0)
    rows = np.flatnonzero((along > 500) & (along < 750))
    points = detour_by(out_and_back, points, rows, offset_m)
    fix_accuracy = np.full(len(points), 5.0)
    fix_accuracy[rows] = accuracy_m
    events = [t for t, _ in run(out_and_back, points, accuracy_m=fix_accuracy)]
    assert [t for t in events if t not in (E.ETA_UPDATED, E.ARRIVED)] == expected


def test_walking_pace_pushes_the_eta_back(out_and_back) -> None:
    points, _ = support.drive(
        out_and_back.lat, out_and_back.lon, 10.0, slow=(300, 900, 1.4)
    )
    monitor = RouteMonitor()
    monitor.assign(out_and_back)
    batch = support.fixes("car-1", points)
    monitor.evaluate(batch.take(np.arange(6)), 0)
    before = monitor.progress("t1", "car-1").eta_ms
    events = monitor.evaluate(batch.take(np.arange(6, 60)), 0)
    assert {e.type for e in events} == {E.ETA_UPDATED}
    assert monitor.progress("t1", "car-1").eta_ms > before + 120_000


def test_many_devices_at_once_match_each_device_alone(out_and_back) -> None:
    points, _ = support.drive(out_and_back.lat, out_and_back.lon, 12.0)
    alone = run(out_and_back, points)
    monitor = RouteMonitor()
    for k in range(5):
        monitor.assign(dataclasses.replace(out_and_back, device=f"car-{k}"))
    batches = [support.fixes(f"car-{k}", points) for k in range(5)]
    events = monitor.evaluate(FixBatch.concat(batches), 0)
    for k in range(5):
        mine = [(e.type, e.fix_seq) for e in events if e.device == f"car-{k}"]
        assert mine == alone


def test_deviation_from_a_single_point_route_is_the_point_distance(field_cases) -> None:
    case = field_cases["C24"]
    start = case["queries"][0]["waypoints"][0]
    fix = case["fixes"][0]
    lat, lon = np.array([start["lat"]] * 2), np.array([start["lon"]] * 2)
    measured = deviation_m(lat, lon, fix["lat"], fix["lon"])
    assert measured == pytest.approx(case["expected"]["D1"]["deviation_m"], abs=0.5)


def test_turning_back_against_the_route_is_off_route(car) -> None:
    route = car.route(np.array([A[0], B[0]]), np.array([A[1], B[1]]), steps=False)
    planned = PlannedRoute(
        "t1", "car-1", "ab", route.lat, route.lon, route.segment_duration_s, 0
    )
    points, along = support.drive(route.lat, route.lon, 10.0)
    turn = int(np.argmax(along > 800))
    back = np.r_[points[: turn + 1], points[turn - 1 :: -1]]  # the way it came
    events = [t for t, _ in run(planned, back) if t != E.ETA_UPDATED]
    assert events == [E.OFF_ROUTE]


def test_a_detour_ending_at_the_destination_is_back_on_route_as_it_arrives(
    car,
) -> None:
    """The last fix, at the destination, is the first back on the route: it
    closes the detour with BACK_ON_ROUTE before ARRIVED (no later fix comes)."""
    route = car.route(np.array([A[0], B[0]]), np.array([A[1], B[1]]), steps=False)
    planned = PlannedRoute(
        "t1", "car-1", "ab", route.lat, route.lon, route.segment_duration_s, 0
    )
    points, along = support.drive(route.lat, route.lon, 10.0)
    rows = np.flatnonzero(along > along[-1] - 400)[:-1]  # all but the last fix
    points = detour(planned, points, rows)
    events = [(t, seq) for t, seq in run(planned, points) if t != E.ETA_UPDATED]
    last = len(points)
    assert events == [
        (E.OFF_ROUTE, rows[2] + 1),
        (E.BACK_ON_ROUTE, last),
        (E.ARRIVED, last),
    ]
