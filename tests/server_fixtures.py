"""A real grpc.aio server on port 0 with the embedded store, and clients for it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2, status_pb2
from tracking.v1 import (
    common_pb2,
    geofence_pb2_grpc,
    history_pb2_grpc,
    track_pb2,
    track_pb2_grpc,
)

from tracking_grpc.config import Settings
from tracking_grpc.server import TrackingServer

StartServer = Callable[..., Awaitable[TrackingServer]]


Metadata = tuple[tuple[str, str], ...]


def bearer(secret: str, tenant: str, role: str = "viewer", **claims: Any) -> Metadata:
    """Call metadata of a caller ("ops") of ``tenant`` in ``role``, its token signed
    HS256 with ``secret`` and valid ten minutes; ``claims`` add to it."""
    body = {"sub": "ops", "tenant": tenant, "role": role, "exp": time.time() + 600}
    token = jwt.encode({**body, **claims}, secret, "HS256")
    return (("authorization", f"Bearer {token}"),)


class TenantStubs:
    """Stubs of a server in JWT mode, and the metadata of an exact viewer, a viewer
    limited to ``coarse_m`` and an admin of a tenant of their own (the production
    database is the whole session's)."""

    def __init__(self, channel: grpc.aio.Channel, secret: str, coarse_m: float):
        self.track = track_pb2_grpc.TrackSessionStub(channel)
        self.history = history_pb2_grpc.HistoryStub(channel)
        self.geofence = geofence_pb2_grpc.GeofenceStub(channel)
        self.tenant = f"tenant-{uuid.uuid4().hex[:8]}"
        self.exact = bearer(secret, self.tenant, precision_m=0)
        self.coarse = bearer(secret, self.tenant, precision_m=coarse_m)
        self.admin = bearer(secret, self.tenant, "admin", precision_m=0)


def embedded_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base = Settings(listen="127.0.0.1:0", data_dir=str(tmp_path / "data"))
    return replace(base, **{"flush_interval_ms": 0.5, **overrides})


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    """Starts servers with settings overrides; stops them all at the end."""
    running: list[TrackingServer] = []

    async def start(**overrides: Any) -> TrackingServer:
        telemetry = overrides.pop("telemetry", None)
        settings = overrides.pop("settings", None) or embedded_settings(
            tmp_path, **overrides
        )
        server = await TrackingServer.start(settings, telemetry)
        running.append(server)
        return server

    yield start
    for server in reversed(running):
        await server.stop(0)


@pytest.fixture
async def server(start_server: StartServer) -> TrackingServer:
    return await start_server()


@pytest.fixture
async def channel(server: TrackingServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> track_pb2_grpc.TrackSessionStub:
    return track_pb2_grpc.TrackSessionStub(channel)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


HANG_GUARD_S = 30.0  # a safety net against a hang, not a measure


async def until(done: Callable[[], bool], timeout_s: float = HANG_GUARD_S) -> None:
    """Wait until ``done()`` holds (state that other tasks change), looking every
    10 ms; a hang fails the test after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not done():  # noqa: ASYNC110 - polls the state of other tasks
            await asyncio.sleep(0.01)


def fix(
    seq: int, lat: float, lon: float, time_ms: int | None = None, **extra: Any
) -> common_pb2.Fix:
    """A fix; without a time, one that follows the seq (100 ms apart, recent)."""
    if time_ms is None:
        time_ms = now_ms() - 60_000 + seq * 100
    return common_pb2.Fix(seq=seq, time_ms=time_ms, lat=lat, lon=lon, **extra)


def hello(device_id: str, **extra: Any) -> track_pb2.TrackRequest:
    return track_pb2.TrackRequest(hello=track_pb2.Hello(device_id=device_id, **extra))


def batch(fixes: Iterable[common_pb2.Fix]) -> track_pb2.TrackRequest:
    return track_pb2.TrackRequest(batch=track_pb2.FixBatch(fixes=list(fixes)))


async def track_session(
    stub: track_pb2_grpc.TrackSessionStub,
    device_id: str,
    batches: list[list[common_pb2.Fix]],
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> tuple[track_pb2.SessionStarted, list[track_pb2.Ack]]:
    """Open a stream, send the batches one after another, return started and acks."""
    call = stub.Track(metadata=metadata)
    await call.write(hello(device_id))
    started = (await call.read()).started
    acks = []
    for fixes in batches:
        await call.write(batch(fixes))
        response = await call.read()
        while response.WhichOneof("message") != "ack":
            response = await call.read()
        acks.append(response.ack)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return started, acks


def violation(error: grpc.aio.AioRpcError) -> tuple[str, str]:
    """The field and description of an INVALID_ARGUMENT's BadRequest detail."""
    trailers = dict(error.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    detail = error_details_pb2.BadRequest()
    status.details[0].Unpack(detail)
    return detail.field_violations[0].field, detail.field_violations[0].description
