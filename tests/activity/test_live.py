"""The live processor: online/offline, overspeed, motion, outliers, smoothing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.activity.helpers import kinds, stream, track
from tests.conftest import TRACES, require_shared
from tracking_grpc.activity.params import ActivityConfig
from tracking_grpc.activity.processor import ActivityProcessor
from tracking_grpc.activity.smooth import filter_track, smooth_track
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.core.geodesy import haversine_m
from tracking_grpc.traces import read_trace

CONFIG = ActivityConfig.from_mapping(
    {
        "defaults": {"offline_after_s": 120},
        "tenants": {"t": {"devices": {"fast": {"speed_limit_mps": 20}}}},
    }
)


def drive(speeds_mps, device="d") -> FixBatch:
    east = np.cumsum(speeds_mps)
    return track(
        east,
        np.zeros(east.size),
        1.0,
        device=device,
        speed_mps=np.asarray(speeds_mps, dtype=float),
    )


async def test_online_then_offline_after_silence_then_online_again():
    processor = ActivityProcessor(CONFIG)
    first = drive([10.0] * 5)
    events = processor.apply(first, created_ms=0)
    last_ms = int(first.time_ms[-1])
    assert kinds(events) == ["ONLINE"]
    assert await processor.tick(last_ms + 60_000) == []
    offline = await processor.tick(last_ms + 121_000)
    assert kinds(offline) == ["OFFLINE"]
    later = track(np.arange(3) * 10.0, np.zeros(3), start_ms=last_ms + 200_000)
    assert kinds(processor.apply(later, created_ms=0))[0] == "ONLINE"


@pytest.mark.parametrize(
    ("device", "seconds_over", "expected"),
    [
        pytest.param(
            "fast", 30, ["OVERSPEED_STARTED", "OVERSPEED_ENDED"], id="30s-over"
        ),
        pytest.param("fast", 5, [], id="5s-burst-too-short"),
        pytest.param("other", 30, [], id="no-limit-set"),
    ],
)
def test_overspeed_needs_the_device_limit_and_min_duration(
    device, seconds_over, expected
):
    speeds = [15.0] * 60 + [25.0] * seconds_over + [15.0] * 60
    _, events = stream(
        drive(speeds, device), chunk=10, processor=ActivityProcessor(CONFIG)
    )
    assert [k for k in kinds(events) if k.startswith("OVERSPEED")] == expected


def test_overspeed_event_carries_limit_and_peak():
    speeds = [15.0] * 60 + [25.0] * 20 + [31.0] * 10 + [15.0] * 60
    _, events = stream(
        drive(speeds, "fast"), chunk=10, processor=ActivityProcessor(CONFIG)
    )
    ended = next(e for e in events if e.type.name == "OVERSPEED_ENDED")
    assert (ended.activity.speed_limit_mps, ended.activity.max_speed_mps) == (
        20.0,
        31.0,
    )
    assert ended.activity.duration_s == pytest.approx(30.0, abs=1.5)


def test_walk_then_drive_changes_motion_once():
    speeds = [1.4] * 300 + [15.0] * 300
    _, events = stream(drive(speeds), chunk=30)
    changes = [e for e in events if e.type.name == "MOTION_CHANGED"]
    assert [e.attributes["motion"] for e in changes] == ["driving"]


def test_spike_is_kept_out_of_the_odometer_live():
    east = np.arange(0, 600, 10.0)
    north = np.zeros(60)
    north[30] = 5_000.0  # one fix 5 km off for a second
    batch = track(east, north)
    processor, _ = stream(batch, chunk=4)
    state = processor.state("t", "d")
    applied_m = 10.0 * (np.sum(batch.time_ms <= state.time_ms) - 1)
    assert applied_m > 400
    assert state.odometer_m == pytest.approx(applied_m, rel=0.02)


def test_far_fix_after_hours_offline_is_accepted():
    home = track(np.arange(0, 300, 10.0), np.zeros(30))
    far = track(
        np.arange(0, 300, 10.0),
        np.full(30, 200_000.0),
        start_ms=int(home.time_ms[-1]) + 3 * 3_600_000,
    )
    processor, _ = stream(FixBatch.concat([home, far]), chunk=5)
    state = processor.state("t", "d")
    assert state.lat == pytest.approx(float(far.lat[-1]), abs=1e-3)


def test_stale_anchor_is_left_after_a_run_of_consistent_fixes():
    start = track(np.zeros(1), np.zeros(1))  # one wrong first fix, 30 km away
    rest = track(
        np.arange(1, 40) * 10.0,
        np.full(39, 30_000.0),
        start_ms=int(start.time_ms[0]) + 1000,
    )
    processor, _ = stream(FixBatch.concat([start, rest]), chunk=1)
    assert processor.state("t", "d").lat == pytest.approx(float(rest.lat[-1]), abs=1e-3)


@pytest.fixture(scope="module")
def noisy_car():
    trace = read_trace(require_shared(TRACES / "gpxpy_around-visnjan-with-car.gpx"))
    rng = np.random.default_rng(7)
    sigma_m = 5.0  # per axis
    scale = 111_195.0
    lat = trace.lat + rng.normal(0, sigma_m, len(trace)) / scale
    lon = trace.lon + rng.normal(0, sigma_m, len(trace)) / (
        scale * np.cos(np.deg2rad(trace.lat))
    )
    return trace, lat, lon, np.full(len(trace), sigma_m)


def rms_m(trace, lat, lon) -> float:
    return float(np.sqrt(np.mean(haversine_m(trace.lat, trace.lon, lat, lon) ** 2)))


def test_smoother_beats_raw_and_5_m_on_noisy_car(noisy_car):
    trace, lat, lon, acc = noisy_car
    smooth = smooth_track(trace.time_ms, lat, lon, acc)
    assert rms_m(trace, *smooth) < 5.0 < rms_m(trace, lat, lon)


def test_live_filter_is_better_than_raw(noisy_car):
    trace, lat, lon, acc = noisy_car
    live = filter_track(trace.time_ms, lat, lon, acc, np.zeros(len(trace), dtype=int))
    assert rms_m(trace, *live) < rms_m(trace, lat, lon)


def test_late_fix_changes_no_live_activity():
    batch = track(np.arange(0, 3000, 10.0), np.zeros(300))
    processor, _ = stream(batch, chunk=10)
    before = processor.state("t", "d")
    late = track(np.array([50_000.0]), np.zeros(1), start_ms=int(batch.time_ms[5]) + 1)
    assert processor.apply(late, created_ms=0) == []
    assert processor.state("t", "d").odometer_m == before.odometer_m


async def test_a_large_batch_is_analysed_while_the_event_loop_serves_others():
    """``process`` analyses a large batch in a worker thread: a task ready
    meanwhile runs before it ends (before, the whole analysis held the loop), and
    the events and state are those of the same batch applied on the loop."""
    fleet = FixBatch.concat(
        [
            drive([12.0] * 40 + [0.0] * 400 + [9.0] * 60, device=f"van{i}")
            for i in range(4)
        ]
    ).sorted_by_device_time()
    processor, reference = ActivityProcessor(CONFIG), ActivityProcessor(CONFIG)
    finished: list[str] = []

    async def another_call() -> None:
        finished.append("other")

    other = asyncio.create_task(another_call())
    events = await processor.process(fleet)
    finished.append("process")
    await other
    assert finished == ["other", "process"]
    expected = reference.apply(fleet, created_ms=0)
    assert kinds(events) == kinds(expected)
    assert "STOP_STARTED" in kinds(events)
    assert processor.state("t", "van3") == reference.state("t", "van3")
