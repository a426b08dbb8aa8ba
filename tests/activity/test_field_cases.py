"""Field cases C19 (parked drift), C21 (short halt in a trip) and C23 (duplicates),
as history analyses and as live event streams, plus inputs of the same kinds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.activity.helpers import case_batch, kinds, parse_ms, stream, track
from tracking_grpc.activity.params import ActivityParams
from tracking_grpc.activity.segments import stops, trips
from tracking_grpc.activity.track import analyse

DEFAULTS = ActivityParams()


def history(batch, params=DEFAULTS):
    a = analyse(batch.sorted_by_device_time(), params, complete=True)
    return a, trips(a, params), stops(a)


def test_c19_parked_drift_is_one_stop_without_distance(field_cases):
    case = field_cases["C19"]
    a, found_trips, found_stops = history(case_batch(case))
    expected = case["expected"]
    assert (len(found_trips), len(found_stops)) == (
        expected["trips"],
        expected["stops"],
    )
    span = [parse_ms(t) for t in expected["stop_span"]]
    assert [found_stops[0].start_ms, found_stops[0].end_ms] == span
    assert a.counted_m.sum() <= expected["odometer_increase_m"]["max_allowed"]


def test_c19_live_raises_no_trip_and_no_motion_change(field_cases):
    processor, events = stream(case_batch(field_cases["C19"]))
    assert kinds(events) == ["ONLINE", "STOP_STARTED"]
    assert processor.state("t", "dev-A").odometer_m == 0.0


@pytest.mark.parametrize(
    ("jitter_m", "step_s", "seed"),
    [
        pytest.param(8.0, 60.0, 1, id="8m-every-minute"),
        pytest.param(15.0, 1.0, 2, id="15m-phone-at-1hz"),
        pytest.param(20.0, 10.0, 3, id="20m-every-10s"),
    ],
)
def test_parked_jitter_of_other_sizes_adds_nothing(jitter_m, step_s, seed):
    rng = np.random.default_rng(seed)
    n = int(3600 / step_s)
    batch = track(
        rng.normal(0, jitter_m / 2, n),
        rng.normal(0, jitter_m / 2, n),
        step_s,
        speed_mps=rng.uniform(0, 4, n),
    )
    a, found_trips, found_stops = history(batch)
    assert (len(found_trips), len(found_stops), a.counted_m.sum()) == (0, 1, 0.0)
    _, events = stream(batch, chunk=7)
    assert "TRIP_STARTED" not in kinds(events) and "MOTION_CHANGED" not in kinds(events)


def test_c21_short_halt_does_not_split_the_trip(field_cases):
    case = field_cases["C21"]
    params = replace(DEFAULTS, min_stop_s=case["params"]["min_parking_duration_s"])
    _, found_trips, found_stops = history(case_batch(case), params)
    expected = case["expected"]
    assert (len(found_trips), len(found_stops)) == (
        expected["trips"],
        expected["stops"],
    )
    trip = found_trips[0]
    assert abs(trip.start.time_ms - parse_ms(expected["trip"]["start_ts"])) <= 30_000
    assert abs(trip.end.time_ms - parse_ms(expected["trip"]["end_ts"])) <= 30_000
    assert trip.distance_m == pytest.approx(expected["trip"]["distance_m"], rel=0.01)


def test_c21_live_events_match_history(field_cases):
    case = field_cases["C21"]
    _, events = stream(case_batch(case))
    activity = [k for k in kinds(events) if k.startswith(("TRIP", "STOP"))]
    assert activity == [
        "STOP_STARTED",
        "STOP_ENDED",
        "TRIP_STARTED",
        "STOP_STARTED",
        "TRIP_ENDED",
    ]
    ended = next(e for e in events if e.type.name == "TRIP_ENDED")
    assert ended.activity.distance_m == pytest.approx(14_399.9, rel=0.01)


def _drive_with_halt(halt_s: float) -> object:
    """Park 10 min, drive 10 min at 12 m/s, halt, drive 10 min, park 10 min."""
    parked = np.zeros(600)
    leg = np.arange(1, 601) * 12.0
    east = np.concatenate(
        [
            parked,
            leg,
            np.full(int(halt_s), leg[-1]),
            leg[-1] + leg,
            np.full(600, 2 * leg[-1]),
        ]
    )
    return track(east, np.zeros(east.size), 1.0)


@pytest.mark.parametrize(
    ("halt_s", "trip_count"),
    [
        pytest.param(60, 1, id="1-min-light"),
        pytest.param(240, 1, id="4-min-jam"),
        pytest.param(420, 2, id="7-min-park-splits"),
    ],
)
def test_halts_split_trips_only_from_min_stop_on(halt_s, trip_count):
    _, found_trips, _ = history(_drive_with_halt(halt_s))
    assert len(found_trips) == trip_count
    assert sum(t.distance_m for t in found_trips) == pytest.approx(14_400, rel=0.01)


def test_c23_duplicates_and_zero_time_steps(field_cases):
    case = field_cases["C23"]
    a, _, _ = history(case_batch(case))
    expected = case["expected"]
    assert a.counted_m.sum() == pytest.approx(expected["distance_m"], rel=0.01)
    speeds = a.steps.speed_mps[a.trusted]
    assert np.all(np.isfinite(speeds) | np.isnan(speeds))
    assert np.nanmax(speeds) <= expected["max_speed_mps"]["max_allowed"]


@pytest.mark.parametrize(
    "chunk", [pytest.param(1, id="one-by-one"), pytest.param(3, id="in-threes")]
)
def test_resent_batches_do_not_add_distance(chunk):
    batch = track(np.arange(0, 3000, 10.0), np.zeros(300), 1.0)
    once, _ = stream(batch, chunk=chunk)
    twice, _ = stream(batch, chunk=chunk)
    stream(batch, chunk=chunk, processor=twice)  # the same fixes again
    assert twice.state("t", "d").odometer_m == once.state("t", "d").odometer_m


def test_same_time_fixes_never_divide_by_zero():
    batch = track(np.array([0.0, 10.0, 13.0, 20.0]), np.zeros(4), 0.0)
    a, _, _ = history(batch)
    assert a.trusted.sum() == 1 and np.isnan(a.steps.speed_mps).sum() == 4


@pytest.mark.parametrize(
    ("bad_lat", "bad_lon", "accuracy_m"),
    [
        pytest.param(0.0, 0.0, 5.0, id="null-island"),
        pytest.param(47.5, 8.0, 5.0, id="55-km-spike"),
        pytest.param(47.0005, 8.0, 900.0, id="900-m-accuracy"),
    ],
)
def test_bad_fixes_add_no_distance(bad_lat, bad_lon, accuracy_m):
    batch = track(np.arange(0, 1000, 10.0), np.zeros(100))
    lat, acc = batch.lat.copy(), batch.accuracy_m.copy()
    lon = batch.lon.copy()
    lat[50], lon[50], acc[50] = bad_lat, bad_lon, accuracy_m
    bad = replace(batch, lat=lat, lon=lon, accuracy_m=acc)
    a, _, _ = history(bad)
    assert not a.trusted[50]
    assert a.counted_m.sum() == pytest.approx(990.0, rel=0.005)
