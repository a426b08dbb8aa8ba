"""The client against a real server on port 0: real traces replayed through Track."""

from __future__ import annotations

import asyncio
import collections

import numpy as np
import pytest
from tracking.v1 import track_pb2

from tests.conftest import TRACES, require_shared
from tracking_grpc.client.fleet import SyntheticFleet
from tracking_grpc.client.replay import ReplayOptions, publish_trace, replay_trace
from tracking_grpc.client.schedule import Pace
from tracking_grpc.client.session import RetryPolicy
from tracking_grpc.client.simulate import simulate
from tracking_grpc.traces import Trace, read_trace

TENANT = "default"
FAST = ReplayOptions(pace=Pace(fast=True), batch_fixes=50)


def trace_of(name: str) -> Trace:
    return read_trace(require_shared(TRACES / name))


@pytest.fixture(scope="module")
def bus() -> Trace:
    return trace_of("liverpool_bus_route14_outbound.csv")


@pytest.fixture(scope="module")
def ais() -> Trace:
    return trace_of("nyharbor_ais_2020-06-30_first_hour.csv")


def newest_per_device(trace: Trace, offset_ms: int) -> dict[str, tuple]:
    """Newest fix (by time, then seq) of each device: (seq, time_ms, lat, lon)."""
    newest = {}
    for i in np.lexsort((trace.seq, trace.time_ms)):
        row = (int(trace.seq[i]), int(trace.time_ms[i]) + offset_ms)
        newest[trace.device[i]] = (*row, float(trace.lat[i]), float(trace.lon[i]))
    return newest


async def stored_seqs(server, device: str) -> list[int]:
    batch = await server.app.history.history(TENANT, device, 0, 2**62)
    return sorted(batch.seq.tolist())


async def test_bus_replay_stores_every_fix_exactly_once(server, stub, bus):
    report = await replay_trace(stub, bus, FAST)
    assert (report.total("sent"), report.total("stored")) == (1533, 1533)
    assert report.total("duplicates") == 0 and not report.rejected()
    assert not report.failed()
    assert await server.app.history.count(TENANT) == 1533


async def test_ais_hour_replay_as_295_devices(server, stub, ais):
    report = await replay_trace(stub, ais, FAST)
    assert len(report.sessions) == 295
    # Two vessels report twice at the same second: duplicates by fix time.
    assert (report.total("stored"), report.total("duplicates")) == (8687, 2)
    assert await server.app.history.count(TENANT) == 8687


async def test_last_positions_are_the_newest_fix_of_each_device(stub, bus):
    report = await replay_trace(stub, bus, FAST)
    expected = newest_per_device(bus, report.offset_ms)
    response = await stub.GetLastPositions(
        track_pb2.GetLastPositionsRequest(device_ids=sorted(expected))
    )
    got = {p.device_id: (p.seq, p.time_ms, p.lat, p.lon) for p in response.positions}
    assert got == expected


async def test_watcher_sees_each_device_move_forward_in_fix_time(stub, bus):
    watch = stub.Watch(track_pb2.WatchRequest(skip_snapshot=True))
    last_seq = {
        device: int(bus.seq[bus.device == device].max()) for device in bus.devices()
    }
    seen = collections.defaultdict(list)

    async def collect() -> None:
        async for response in watch:
            for p in response.positions:
                seen[p.device_id].append((p.time_ms, p.seq))
            if all(seen[d] and seen[d][-1][1] == s for d, s in last_seq.items()):
                return

    collector = asyncio.create_task(collect())
    await asyncio.sleep(0.2)  # the watch is registered before the first fix
    await replay_trace(stub, bus, ReplayOptions(pace=Pace(fast=True), batch_fixes=5))
    await asyncio.wait_for(collector, timeout=30)
    watch.cancel()
    for device, updates in seen.items():
        times = [time_ms for time_ms, _ in updates]
        assert times == sorted(times), device


async def test_disconnect_and_resume_loses_and_duplicates_nothing(server, stub, bus):
    options = ReplayOptions(pace=Pace(fast=True), batch_fixes=20, window=4)
    breaks = dict.fromkeys(bus.devices(), 3)
    report = await replay_trace(stub, bus, options, break_after_batches=breaks)
    assert report.total("reconnects") == 8
    # A batch cut off in flight may be stored after the resume: a duplicate then.
    assert (
        sum(report.total(n) for n in ("stored", "duplicates", "stored_before_ack"))
        == 1533
    )
    assert not report.failed()
    for device in bus.devices():
        n = int((bus.device == device).sum())
        assert await stored_seqs(server, device) == list(range(1, n + 1)), device


async def test_reconnects_after_a_server_restart(start_server, tmp_path, bus):
    import grpc
    from tracking.v1 import track_pb2_grpc

    first = await start_server()
    port = first.port
    # Short waits: the restart and the channel's own reconnect back-off can take
    # several seconds on a busy machine, well within the give-up time.
    retry = RetryPolicy(max_s=0.5)
    options = ReplayOptions(pace=Pace(speed=8664 / 3), retry=retry)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        replay = asyncio.create_task(
            replay_trace(track_pb2_grpc.TrackSessionStub(channel), bus, options)
        )
        await asyncio.sleep(1.0)
        await first.stop(0)
        second = await start_server(listen=f"127.0.0.1:{port}")
        report = await asyncio.wait_for(replay, timeout=60)
    assert report.total("reconnects") >= 1 and not report.failed()
    assert await second.app.history.count(TENANT) == 1533


@pytest.mark.parametrize(
    ("name", "fixes"),
    [
        pytest.param("trackintel_posmo_trajectory.csv", 1327, id="posmo-unsorted-file"),
        pytest.param("gpxpy_around-visnjan-with-car.gpx", 104, id="car-gpx"),
    ],
)
async def test_single_device_files_replay_completely(server, stub, name, fixes):
    report = await replay_trace(stub, trace_of(name), FAST)
    assert report.total("stored") == fixes
    assert await server.app.history.count(TENANT) == fixes


async def test_original_times_are_rejected_as_ancient_by_default(stub, bus):
    options = ReplayOptions(pace=Pace(fast=True), original_times=True)
    report = await replay_trace(stub, bus.take(bus.device == "4716"), options)
    n = int((bus.device == "4716").sum())
    assert report.rejected() == {"REJECT_REASON_ANCIENT_TIME": n}
    assert not report.failed()


async def test_original_times_kept_when_the_server_accepts_any_age(start_server, bus):
    import grpc
    from tracking.v1 import track_pb2_grpc

    server = await start_server(max_fix_age_s=0)
    options = ReplayOptions(pace=Pace(fast=True), original_times=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        await replay_trace(stub, bus, options)
        stored = await server.app.history.history(TENANT, "4716", 0, 2**62)
    assert stored.time_ms.tolist() == bus.time_ms[bus.device == "4716"].tolist()


async def test_gateway_publish_replay(server, stub, ais):
    options = ReplayOptions(pace=Pace(fast=True), batch_fixes=2000)
    report = await publish_trace(stub, ais, options)
    assert report.summary("ais").startswith("ais: 295 devices, 8689 fixes")
    assert (report.total("stored"), report.total("duplicates")) == (8687, 2)
    assert await server.app.history.count(TENANT) == 8687


async def test_simulated_fleet_is_stored(server, stub):
    fleet = SyntheticFleet(5, (60.1699, 24.9384), seed=2)
    report = await simulate(stub, fleet, interval_s=0.1, duration_s=0.5)
    assert report.total("stored") == 25 and not report.failed()
    first = await stored_seqs(server, "sim-0003")
    assert first == list(range(first[0], first[0] + 5))
    # A second run with the same device ids goes on after the first.
    again = await simulate(stub, fleet, interval_s=0.1, duration_s=0.5)
    assert again.total("stored") == 25 and again.total("duplicates") == 0
    seqs = await stored_seqs(server, "sim-0003")
    assert len(seqs) == 10 and seqs[:5] == first and seqs[5] > first[-1]


async def test_timed_replay_stamps_the_last_fix_when_it_is_sent(server, stub):
    car = trace_of("gpxpy_around-visnjan-with-car.gpx")  # 514 s long
    await replay_trace(stub, car, ReplayOptions(pace=Pace(speed=514 / 1.5)))
    stored = await server.app.history.history(TENANT, car.devices()[0], 0, 2**62)
    lag_ms = stored.received_ms - stored.time_ms
    assert np.diff(stored.time_ms).tolist() == np.diff(car.time_ms).tolist()
    assert lag_ms.min() >= 0  # never stamped after it was sent
    assert lag_ms[-1] < 2_000 < 500_000 < lag_ms[0]  # first lags D (1 - 1/N)


async def test_events_come_back_on_the_device_streams(stub, bus):
    events = []
    options = ReplayOptions(pace=Pace(fast=True), want_events=True)
    report = await replay_trace(stub, bus, options, on_event=events.append)
    assert report.total("events") == len(events) > 0
    assert {event.device_id for event in events} <= set(bus.devices())
