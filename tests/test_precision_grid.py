"""The precision grid on arrays: cell centres near their fixes, stable, and honest
about their accuracy, on a real trace and at the awkward places of the globe."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TRACES, require_shared
from tracking_grpc.config import Settings, check
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.core.geodesy import haversine_m
from tracking_grpc.core.precision import (
    coarsen,
    round_eta_ms,
    slack_m,
    snap,
    widen_box,
)
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.events import ActivityDetail, EventType, TrackingEvent
from tracking_grpc.servicers.event_messages import event_messages
from tracking_grpc.traces import read_trace

AWKWARD = {
    "north-pole": (90.0, 12.0),
    "south-pole": (-90.0, -170.0),
    "antimeridian-east": (10.0, 180.0),
    "antimeridian-west": (10.0, -180.0),
    "equator": (0.0, 0.0),
    "near-pole": (89.99, 45.0),
}


@pytest.fixture(scope="module")
def bus() -> FixBatch:
    path = require_shared(TRACES / "liverpool_bus_route14_outbound.csv")
    return read_trace(path).to_batch("t")


@pytest.mark.parametrize("precision_m", [10.0, 1_000.0, 50_000.0])
def test_every_fix_lies_within_its_cells_bound(bus, precision_m) -> None:
    lat, lon, bound_m = snap(bus.lat, bus.lon, precision_m)

    away_m = haversine_m(lat, lon, bus.lat, bus.lon)

    assert np.all(away_m <= bound_m)
    assert np.all(bound_m <= slack_m(precision_m))
    assert len(set(zip(lat.tolist(), lon.tolist(), strict=True))) < len(bus)


def test_snapping_twice_changes_nothing(bus) -> None:
    lat, lon, _ = snap(bus.lat, bus.lon, 250.0)

    again_lat, again_lon, _ = snap(lat, lon, 250.0)

    assert np.array_equal(lat, again_lat) and np.array_equal(lon, again_lon)


@pytest.mark.parametrize(("lat", "lon"), AWKWARD.values(), ids=AWKWARD.keys())
def test_awkward_places_snap_onto_the_globe(lat, lon) -> None:
    center_lat, center_lon, bound_m = snap([lat], [lon], 1_000.0)

    assert -90 < center_lat[0] < 90 and -180 <= center_lon[0] < 180
    assert haversine_m(center_lat, center_lon, lat, lon)[0] <= bound_m[0]
    assert bound_m[0] <= slack_m(1_000.0)


def test_coarse_fixes_withhold_motion_and_widen_accuracy(bus) -> None:
    coarse = coarsen(bus, 1_000.0)

    assert np.all(np.isnan(coarse.heading_deg)) and not np.all(
        np.isnan(bus.heading_deg)
    )
    assert np.all(np.isnan(coarse.speed_mps) & np.isnan(coarse.altitude_m))
    assert np.all(coarse.accuracy_m >= 700)
    assert np.array_equal(coarse.seq, bus.seq) and coarse.lat is not bus.lat


def test_precision_zero_leaves_fixes_exact(bus) -> None:
    assert coarsen(bus, 0.0) is bus


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        pytest.param((10, -10, 11, 10), (-10.0092, 10.0092), id="plain"),
        pytest.param((10, 170, 11, -170), (169.9908, -169.9908), id="antimeridian"),
        pytest.param((10, -180, 11, 180), (-180.0, 180.0), id="whole-band"),
        pytest.param((89.995, 0, 90, 1), (-180.0, 180.0), id="polar"),
    ],
)
def test_widened_boxes(box, expected) -> None:
    south, west, north, east = widen_box(box, 1_000.0)

    assert (round(west, 4), round(east, 4)) == expected
    assert south < box[0] and north >= box[2]


@pytest.mark.parametrize("value", [-1.0, float("inf"), 2e6, 1e-310, 0.5])
def test_a_bad_default_precision_is_refused(value) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check(Settings(default_precision_m=value))

    assert raised.value.field == "default_precision_m"


def test_event_messages_carry_cell_centres_and_round_distances() -> None:
    event = TrackingEvent(
        event_id="e1",
        tenant="t",
        device="4716",
        type=EventType.OFF_ROUTE,
        time_ms=1_700_000_000_000,
        lat=53.44451,
        lon=-2.925173,
        fix_seq=1,
        created_ms=1_700_000_000_100,
        attributes={"accuracy_m": "5", "deviation_m": "312.4"},
    )

    (exact,) = event_messages([event])
    (coarse,) = event_messages([event], 1_000.0)

    lat, lon, bound_m = snap([event.lat], [event.lon], 1_000.0)
    assert (exact.position.lat, exact.position.lon) == (event.lat, event.lon)
    assert (coarse.position.lat, coarse.position.lon) == (lat[0], lon[0])
    assert coarse.attributes["accuracy_m"] == f"{bound_m[0] + 5:.0f}"
    assert coarse.attributes["deviation_m"] == "0"


def test_coarse_activity_events_carry_no_speeds() -> None:
    """A trip's average speed times its duration gave back its exact distance."""
    trip = ActivityDetail(
        distance_m=3661.3,
        duration_s=298.0,
        speed_mps=12.3,
        avg_speed_mps=12.29,
        max_speed_mps=31.0,
        odometer_m=10_420.0,
    )
    event = TrackingEvent(
        event_id="e2",
        tenant="t",
        device="car",
        type=EventType.TRIP_ENDED,
        time_ms=1_700_000_000_000,
        lat=41.15,
        lon=-8.61,
        fix_seq=9,
        created_ms=1_700_000_000_100,
        attributes={"speed_mps": "12.3"},
        activity=trip,
    )

    (exact,) = event_messages([event])
    (coarse,) = event_messages([event], 500.0)

    assert exact.activity.avg_speed_mps == pytest.approx(12.29)
    detail = coarse.activity
    assert (detail.speed_mps, detail.avg_speed_mps, detail.max_speed_mps) == (0, 0, 0)
    assert (detail.distance_m, detail.odometer_m) == (3500.0, 10_500.0)
    assert "speed_mps" not in coarse.attributes


def test_coarse_etas_are_rounded_up_to_a_cells_crossing() -> None:
    fix_ms = 1_700_000_000_000
    # 1 km at the reference 10 m/s: 100-s steps; 113.041 s left shows as 200
    assert round_eta_ms(fix_ms + 113_041, fix_ms, 1_000.0) == fix_ms + 200_000
    assert round_eta_ms(fix_ms + 143_034, fix_ms, 1_000.0) == fix_ms + 200_000
    # a small grid still rounds to whole minutes
    assert round_eta_ms(fix_ms + 61_000, fix_ms, 50.0) == fix_ms + 120_000
    assert round_eta_ms(fix_ms + 113_041, fix_ms, 0.0) == fix_ms + 113_041
    event = TrackingEvent(
        event_id="e3",
        tenant="t",
        device="car",
        type=EventType.ETA_UPDATED,
        time_ms=fix_ms,
        lat=41.15,
        lon=-8.61,
        fix_seq=3,
        created_ms=fix_ms,
        attributes={"eta_ms": str(fix_ms + 113_041), "remaining_m": "1362.0"},
    )
    (coarse,) = event_messages([event], 1_000.0)
    assert coarse.attributes["eta_ms"] == str(fix_ms + 200_000)
    assert coarse.attributes["remaining_m"] == "1000"
