"""Real traces from ../shared/data/traces: distances, outliers, trips."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.activity.helpers import bus_trip_ids, stream
from tests.conftest import TRACES, require_shared
from tracking_grpc.activity import views
from tracking_grpc.activity.params import ActivityParams
from tracking_grpc.activity.patterns import daily_summary
from tracking_grpc.activity.segments import stops, trips
from tracking_grpc.activity.track import analyse
from tracking_grpc.core.geodesy import haversine_m, path_length_m
from tracking_grpc.traces import read_trace

CAR = "gpxpy_around-visnjan-with-car.gpx"
POSMO = "trackintel_posmo_trajectory.csv"
BUS = "liverpool_bus_route14_outbound.csv"
TRAIN_MPS = 250 / 3.6  # faster than any train on the Swiss plateau
DEFAULTS = ActivityParams()
# A bus operator's tenant: timing points and driver changes hold a bus for up to ten
# minutes mid-route, so a stop needs ten minutes there.
BUS_PARAMS = replace(DEFAULTS, min_stop_s=600.0)


def batch_of(name: str):
    return read_trace(require_shared(TRACES / name)).to_batch("t")


def test_car_distance_matches_great_circle_sum_within_1_percent():
    batch = batch_of(CAR)
    a = analyse(batch.sorted_by_device_time(), DEFAULTS, complete=True)
    expected = path_length_m(batch.lat, batch.lon)
    assert a.counted_m.sum() == pytest.approx(expected, rel=0.01)
    # Live, the odometer has taken in the fixes whose activity is final: the last
    # minutes while the car stands are held until a stop is ruled in or out.
    processor, _ = stream(batch, chunk=10)
    state = processor.state("t", batch.device[0])
    applied = batch.time_ms <= state.time_ms
    assert batch.time_ms[-1] - state.time_ms <= DEFAULTS.min_stop_s * 1000
    expected_live = path_length_m(batch.lat[applied], batch.lon[applied])
    assert state.odometer_m == pytest.approx(expected_live, rel=0.01)


def test_posmo_loses_jumps_and_no_clean_step_beats_a_train():
    batch = batch_of(POSMO).sorted_by_device_time()
    a = analyse(batch, DEFAULTS, complete=True)
    kept = batch.take(a.trusted)
    step_m = haversine_m(kept.lat[:-1], kept.lon[:-1], kept.lat[1:], kept.lon[1:])
    dt_s = np.diff(kept.time_ms) / 1000.0
    # Speed beyond the position noise the rule allows (jump_slack_m).
    assert np.all(step_m - DEFAULTS.jump_slack_m <= TRAIN_MPS * dt_s)
    raw_m = haversine_m(batch.lat[:-1], batch.lon[:-1], batch.lat[1:], batch.lon[1:])
    raw_jumps = raw_m > TRAIN_MPS * np.diff(batch.time_ms) / 1000.0 + 5.0
    assert raw_jumps.sum() >= 70 and len(kept) >= 0.6 * len(batch)


def test_posmo_live_never_steps_faster_than_a_train():
    batch = batch_of(POSMO)
    processor, _ = stream(batch, chunk=5)
    state = processor.state("t", batch.device[0])
    duration_s = (batch.time_ms.max() - batch.time_ms.min()) / 1000.0
    assert state.odometer_m <= TRAIN_MPS * duration_s


@pytest.fixture(scope="module")
def bus():
    batch = read_trace(require_shared(TRACES / BUS)).to_batch("t")
    return batch.sorted_by_device_time(), bus_trip_ids(TRACES / BUS)


def test_bus_trips_match_recorded_trip_ids(bus):
    batch, recorded = bus
    found = trips(analyse(batch, BUS_PARAMS, complete=True), BUS_PARAMS)
    ids = [
        (recorded[(t.device, t.start.time_ms)], recorded[(t.device, t.end.time_ms)])
        for t in found
    ]
    assert all(start == end for start, end in ids)  # never bridges two trips
    assert sorted(start for start, _ in ids) == sorted(set(recorded.values()))


def test_bus_trip_ends_match_and_starts_differ_only_by_layover(bus):
    batch, recorded = bus
    found = trips(analyse(batch, BUS_PARAMS, complete=True), BUS_PARAMS)
    for trip in found:
        trip_id = recorded[(trip.device, trip.start.time_ms)]
        times = [
            t for (d, t), i in recorded.items() if d == trip.device and i == trip_id
        ]
        assert trip.end.time_ms == max(times)
        assert 0 <= trip.start.time_ms - min(times) <= 15 * 60_000


def test_bus_default_rules_split_but_never_bridge(bus):
    batch, recorded = bus
    found = trips(analyse(batch, DEFAULTS, complete=True), DEFAULTS)
    assert len(found) >= 16
    for trip in found:
        assert (
            recorded[(trip.device, trip.start.time_ms)]
            == recorded[(trip.device, trip.end.time_ms)]
        )


def test_bus_live_trips_agree_with_history(bus):
    batch, _ = bus
    found = trips(analyse(batch, BUS_PARAMS, complete=True), BUS_PARAMS)
    from tracking_grpc.activity.params import ActivityConfig
    from tracking_grpc.activity.processor import ActivityProcessor

    config = ActivityConfig(defaults=BUS_PARAMS)
    _, events = stream(batch, chunk=20, processor=ActivityProcessor(config))
    started = sorted(
        (e.device, e.time_ms) for e in events if e.type.name == "TRIP_STARTED"
    )
    assert started == sorted((t.device, t.start.time_ms) for t in found)


def test_posmo_top_speeds_are_the_cleaned_tracks():
    """A trusted step may beat max_speed_mps by the jump filter's slack (74.2 m/s
    here, against 70): the trip's top speed (ListTrips and the live TRIP_ENDED) and
    the day's are that step's speed, as the cleaned track (GetTrack) shows it."""
    batch = batch_of(POSMO).sorted_by_device_time()
    a = analyse(batch, DEFAULTS, complete=True)
    cleaned = views.clean(a)
    moving = ~a.in_stop[a.trusted]
    top = float(np.nanmax(cleaned.speed_mps[moving]))
    assert top > DEFAULTS.max_speed_mps
    found = trips(a, DEFAULTS)
    start, end = int(batch.time_ms[0]), int(batch.time_ms[-1]) + 1
    days = daily_summary(a, found, stops(a), start, end, "UTC")
    _, events = stream(batch, chunk=50)
    ended = [e.activity.max_speed_mps for e in events if e.type.name == "TRIP_ENDED"]
    assert max(t.max_speed_mps for t in found) == pytest.approx(top, rel=1e-6)
    assert max(d.max_speed_mps for d in days) == pytest.approx(top, rel=1e-6)
    assert max(ended) == pytest.approx(top, rel=1e-6)
