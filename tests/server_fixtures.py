"""A real grpc.aio server on port 0 with the embedded store, and clients for it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc

from tracking_grpc.config import Settings
from tracking_grpc.server import TrackingServer

StartServer = Callable[..., Awaitable[TrackingServer]]


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
