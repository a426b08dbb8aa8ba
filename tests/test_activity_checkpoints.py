"""Live activity across restarts and server processes, through real servers on the
embedded and the production backends: a restarted server continues the odometer
and the trip from the checkpoint saved at its clean stop, and EraseDevice removes
the checkpoint; on the production backends, with ``tracking serve`` processes,
another process answers GetActivity for a device it never saw, and one continues
the trip of a process killed mid-trip."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tracking.v1 import common_pb2, history_pb2, history_pb2_grpc, track_pb2_grpc

from tests.activity.helpers import stream
from tests.backends import BACKENDS, backend_settings, unique_tenant
from tests.conftest import TRACES, require_shared
from tests.server_fixtures import (
    Metadata,
    bearer,
    embedded_settings,
    now_ms,
    track_session,
)
from tests.services import ServerProcess
from tracking_grpc.activity.processor import DeviceActivity
from tracking_grpc.config import Settings
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.server import TrackingServer
from tracking_grpc.traces import read_trace

SECRET = "activity-checkpoints-secret-of-enough-length"
CAR = "gpxpy_around-visnjan-with-car.gpx"  # 104 fixes, 8.5 minutes of driving


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Checkpoints only at a clean stop (the interval outlasts every test)."""
    base = embedded_settings(
        tmp_path, auth_mode="jwt", jwt_hs256_secret=SECRET, activity_checkpoint_s=600
    )
    return backend_settings(request, base)


@pytest.fixture
async def servers() -> AsyncIterator[list[TrackingServer]]:
    """Servers a test starts (by ``TrackingServer.start``); stopped at the end."""
    running: list[TrackingServer] = []
    yield running
    for server in reversed(running):
        await server.stop(0)


def as_admin(tenant: str) -> Metadata:
    return bearer(SECRET, tenant, "admin")


def car_trace() -> FixBatch:
    """The car trace as device "car", moved to end a minute ago (the server takes
    recent fixes)."""
    batch = read_trace(require_shared(TRACES / CAR)).to_batch("t")
    shift_ms = now_ms() - 60_000 - int(batch.time_ms.max())
    return FixBatch.from_columns(
        "t", ["car"] * len(batch), batch.seq, batch.time_ms + shift_ms, batch.lat,
        batch.lon,
    )  # fmt: skip


def expected(batch: FixBatch) -> DeviceActivity:
    """The car's activity from one processor that saw every fix."""
    processor, _ = stream(batch, chunk=20)
    state = processor.state("t", "car")
    assert state is not None
    return state


async def send(
    server: TrackingServer | ServerProcess, tenant: str, batch: FixBatch
) -> None:
    fixes = [
        common_pb2.Fix(seq=int(s), time_ms=int(t), lat=float(a), lon=float(o))
        for s, t, a, o in zip(
            batch.seq, batch.time_ms, batch.lat, batch.lon, strict=True
        )
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        parts = [fixes[i : i + 20] for i in range(0, len(fixes), 20)]
        await track_session(stub, "car", parts, metadata=as_admin(tenant))


async def activity(
    server: TrackingServer | ServerProcess, tenant: str, time_ms: int
) -> history_pb2.GetActivityResponse:
    """GetActivity of the car once it has applied the fix at ``time_ms``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = history_pb2_grpc.HistoryStub(channel)
        request = history_pb2.GetActivityRequest(device_id="car")
        async with asyncio.timeout(30):
            while True:
                try:
                    state = await stub.GetActivity(request, metadata=as_admin(tenant))
                    if state.time_ms >= time_ms:
                        return state
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                await asyncio.sleep(0.05)


async def activity_code(server: TrackingServer, tenant: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = history_pb2_grpc.HistoryStub(channel)
        request = history_pb2.GetActivityRequest(device_id="car")
        try:
            await stub.GetActivity(request, metadata=as_admin(tenant))
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_a_restarted_server_continues_the_odometer_and_the_trip(
    servers, settings
) -> None:
    tenant, trace = unique_tenant(), car_trace()
    half = trace.take(np.arange(len(trace) // 2))
    first = await TrackingServer.start(settings)
    servers.append(first)
    await send(first, tenant, half)
    before = await activity(first, tenant, expected(half).time_ms)
    assert before.in_trip and before.odometer_m > 1000
    await first.stop(5)  # saves the checkpoints

    second = await TrackingServer.start(settings)
    servers.append(second)
    await send(second, tenant, trace.take(np.arange(len(half), len(trace))))
    want = expected(trace)
    after = await activity(second, tenant, want.time_ms)

    assert after.in_trip and after.trip_since_ms == before.trip_since_ms
    assert after.odometer_m == pytest.approx(want.odometer_m, abs=1.0)
    assert after.trip_distance_m == pytest.approx(want.trip_distance_m, abs=1.0)


@pytest.fixture
def processes(production_env: dict[str, str]) -> Iterator[list[ServerProcess]]:
    """Two ``tracking serve`` processes on the session's PostgreSQL and Redis,
    saving checkpoints every 0.2 s; started by the test."""
    env = {
        **production_env,
        "TRACKING_AUTH_MODE": "jwt",
        "TRACKING_JWT_HS256_SECRET": SECRET,
        "TRACKING_ACTIVITY_CHECKPOINT_S": "0.2",
    }
    made = [ServerProcess(env), ServerProcess(env)]
    try:
        yield made
    finally:
        for process in made:
            process.stop()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_another_process_answers_for_a_device_it_never_saw(processes) -> None:
    tenant, trace = unique_tenant(), car_trace()
    receiving, other = processes
    receiving.start()
    other.start()
    await send(receiving, tenant, trace)
    want = await activity(receiving, tenant, expected(trace).time_ms)

    got = await activity(other, tenant, want.time_ms)

    assert got.odometer_m == pytest.approx(want.odometer_m, abs=1.0)
    assert (got.in_trip, got.trip_since_ms, got.in_stop, got.motion) == (
        want.in_trip,
        want.trip_since_ms,
        want.in_stop,
        want.motion,
    )
    assert got.online and got.time_ms == want.time_ms


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_after_a_crash_another_process_continues_the_trip(processes) -> None:
    tenant, trace = unique_tenant(), car_trace()
    half = trace.take(np.arange(len(trace) // 2))
    crashing, taking_over = processes
    crashing.start()
    await send(crashing, tenant, half)
    before = await activity(crashing, tenant, expected(half).time_ms)
    await asyncio.sleep(1.0)  # a few checkpoint rounds
    crashing.kill()

    taking_over.start()
    await send(taking_over, tenant, trace.take(np.arange(len(half), len(trace))))
    want = expected(trace)
    after = await activity(taking_over, tenant, want.time_ms)

    assert after.in_trip and after.trip_since_ms == before.trip_since_ms
    assert after.odometer_m == pytest.approx(want.odometer_m, abs=1.0)


async def test_erasure_removes_the_checkpoint(servers, settings) -> None:
    tenant, trace = unique_tenant(), car_trace()
    first = await TrackingServer.start(settings)
    servers.append(first)
    await send(first, tenant, trace)
    await activity(first, tenant, expected(trace).time_ms)
    # The newest fixes are not final when that time is reached: a part still
    # waiting for the processors would bring the device back after the erasure.
    async with asyncio.timeout(30):
        while True:
            if first.app.pipeline.idle:
                break
            await asyncio.sleep(0.01)
    assert await first.app.activity.save_checkpoints() == 1
    stored = await first.app.history.load_checkpoints(tenant, ["car"])
    assert stored.devices == ["car"]

    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        await history_pb2_grpc.HistoryStub(channel).EraseDevice(
            history_pb2.EraseDeviceRequest(device_id="car"), metadata=as_admin(tenant)
        )
    assert await first.app.activity.save_checkpoints() == 0
    stored = await first.app.history.load_checkpoints(tenant, ["car"])
    assert stored.devices == []
    await first.stop(5)

    second = await TrackingServer.start(settings)
    servers.append(second)
    assert await activity_code(second, tenant) == grpc.StatusCode.NOT_FOUND
