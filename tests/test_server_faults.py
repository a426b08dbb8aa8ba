"""A server on the production backends while a private Redis or PostgreSQL (started
by the test) goes down and comes back.

Redis down: devices keep streaming and getting acks, live reads answer UNAVAILABLE
with a message, health says the live dependency is NOT_SERVING, and once Redis is
back (empty) the live state is rebuilt from history. PostgreSQL down: nothing is
acknowledged, the server reports NOT_SERVING, and the held batch is acknowledged
once PostgreSQL returns, without a restart.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from functools import partial

import grpc
import numpy as np
import psycopg
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tracking.v1 import track_pb2, track_pb2_grpc

from tests.backends import require_service
from tests.server_fixtures import batch, embedded_settings, fix, hello, now_ms
from tests.services import PostgresServer, RedisServer
from tracking_grpc.observability import metrics
from tracking_grpc.storage import redis_keys as keys
from tracking_grpc.storage import schema

pytestmark = pytest.mark.slow
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def private_redis(tmp_path):
    try:
        server = RedisServer(tmp_path)
    except FileNotFoundError as exc:
        require_service("redis-server", str(exc))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_postgres():
    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        require_service("PostgreSQL binaries", str(exc))
    server.start()
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE tracking")
    asyncio.run(schema.migrate(server.url("tracking")))
    yield server
    server.destroy()


async def health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def until(check, timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - polls another process
            await asyncio.sleep(0.1)


async def open_track(stub, device: str):
    call = stub.Track()
    await call.write(hello(device))
    await call.read()
    return call


async def test_redis_outage_keeps_acks_and_degrades_live_reads(
    private_redis, pg_url, start_server, tmp_path
) -> None:
    settings = replace(
        embedded_settings(tmp_path), database_url=pg_url, redis_url=private_redis.url
    )
    server = await start_server(settings=settings)
    device, t0 = f"tug-{uuid.uuid4().hex[:8]}", now_ms() - 60_000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        call = await open_track(stub, device)
        await call.write(batch([fix(1, 40.7, -74.0, t0)]))
        assert (await call.read()).ack.acked_seq == 1
        private_redis.stop()
        await call.write(batch([fix(2, 40.71, -74.0, t0 + 1000)]))
        assert (await call.read()).ack.acked_seq == 2  # history is the source of truth
        request = track_pb2.GetLastPositionsRequest(device_ids=[device])
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.GetLastPositions(request)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unavailable" in failure.value.details()
        await until(lambda: _is(channel, "tracking.dependency.live", NOT_SERVING))
        assert await health(channel) == SERVING

        private_redis.start()  # empty: the live state must come back from history
        await until(lambda: _is(channel, "tracking.dependency.live", SERVING))
        reply = await stub.GetLastPositions(request)
        assert [p.seq for p in reply.positions] == [2]
        await call.done_writing()


@pytest.mark.parametrize("servers", [1, 2], ids=["same-server", "another-server"])
async def test_an_open_watch_gets_the_position_stored_while_redis_was_down(
    servers, private_redis, pg_url, start_server, tmp_path
) -> None:
    """The update skipped while Redis was down reaches a watcher that stayed open
    once the live state is back, without the device sending again (a device that
    parked during the outage would otherwise stay where the watcher last saw it).
    With two servers on the same backends the watcher's server lost its
    subscription too, and catches up once Redis is back."""
    settings = replace(
        embedded_settings(tmp_path), database_url=pg_url, redis_url=private_redis.url
    )
    watching = storing = await start_server(settings=settings)
    if servers == 2:
        other = replace(settings, data_dir=str(tmp_path / "storing"))
        storing = await start_server(settings=other)
    device, t0 = f"skiff-{uuid.uuid4().hex[:8]}", now_ms() - 60_000
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{watching.port}") as watch_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{storing.port}") as channel,
    ):
        request = track_pb2.WatchRequest(device_ids=[device])
        watch = track_pb2_grpc.TrackSessionStub(watch_channel).Watch(request)
        assert (await watch.read()).snapshot_done  # registered: updates follow
        call = await open_track(track_pb2_grpc.TrackSessionStub(channel), device)
        await call.write(batch([fix(1, 40.7, -74.0, t0)]))
        assert (await call.read()).ack.acked_seq == 1
        first = await asyncio.wait_for(watch.read(), 15.0)
        assert [p.seq for p in first.positions] == [1]
        private_redis.stop()
        await call.write(batch([fix(2, 40.71, -74.0, t0 + 1000)]))
        assert (await call.read()).ack.acked_seq == 2
        live = "tracking.dependency.live"
        await until(lambda: _is(watch_channel, live, NOT_SERVING))

        private_redis.start()  # empty: the live state comes back from history
        update = await asyncio.wait_for(watch.read(), 15.0)
        assert [p.seq for p in update.positions] == [2]
        watch.cancel()
        await call.done_writing()


async def test_server_starts_without_redis_and_catches_up(
    private_redis, pg_url, start_server, tmp_path
) -> None:
    private_redis.stop()
    settings = replace(
        embedded_settings(tmp_path), database_url=pg_url, redis_url=private_redis.url
    )
    server = await start_server(settings=settings)
    device, t0 = f"barge-{uuid.uuid4().hex[:8]}", now_ms() - 60_000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        call = await open_track(stub, device)
        await call.write(batch([fix(1, 40.7, -74.0, t0)]))
        assert (await call.read()).ack.acked_seq == 1
        await until(lambda: _is(channel, "tracking.dependency.live", NOT_SERVING))

        private_redis.start()
        await until(lambda: _is(channel, "tracking.dependency.live", SERVING))
        request = track_pb2.GetLastPositionsRequest(device_ids=[device])
        assert [p.seq for p in (await stub.GetLastPositions(request)).positions] == [1]
        await call.done_writing()


async def test_postgres_outage_holds_acks_until_it_returns(
    private_postgres, redis_url, redis_prefix, start_server, tmp_path
) -> None:
    url = private_postgres.url("tracking")
    settings = replace(
        embedded_settings(tmp_path), database_url=url, redis_url=redis_url,
        redis_key_prefix=redis_prefix, database_timeout_s=1.0,
    )  # fmt: skip
    server = await start_server(settings=settings)
    device, t0 = f"ferry-{uuid.uuid4().hex[:8]}", now_ms() - 60_000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = await open_track(track_pb2_grpc.TrackSessionStub(channel), device)
        await call.write(batch([fix(1, 40.7, -74.0, t0)]))
        assert (await call.read()).ack.acked_seq == 1
        private_postgres.stop()
        await call.write(batch([fix(2, 40.71, -74.0, t0 + 1000)]))
        pending = asyncio.create_task(call.read())
        await until(lambda: _is(channel, "", NOT_SERVING))
        assert not pending.done()  # nothing acknowledged that is not stored

        private_postgres.start()
        assert (await asyncio.wait_for(pending, 30)).ack.acked_seq == 2
        await until(lambda: _is(channel, "", SERVING))
        await call.done_writing()
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT seq FROM fixes WHERE device = %s", [device])
        assert sorted(seq for (seq,) in rows) == [1, 2]


async def test_a_failing_live_update_is_counted_and_acks_go_on(
    pg_url, redis_url, redis_prefix, start_server, tmp_path
) -> None:
    """A live update that fails while Redis is up (here a device's live hash
    holds a string, so the update script errs) is logged and counted apart from
    an outage; the fix is stored and acknowledged, and once the key is mended the
    device's next fix reaches the live state."""
    settings = replace(
        embedded_settings(tmp_path, metrics_listen="127.0.0.1:0"),
        database_url=pg_url, redis_url=redis_url, redis_key_prefix=redis_prefix,
    )  # fmt: skip
    server = await start_server(settings=settings)
    device, t0 = f"skiff-{uuid.uuid4().hex[:8]}", now_ms() - 60_000
    bucket = int(keys.bucket_of(np.array([device]))[0])
    spoiled = keys.live_key(redis_prefix, "default", bucket)
    failures = partial(
        metrics.registry().get_sample_value,
        "tracking_live_update_failures_total",
        {"reason": "error"},
    )
    with redis.Redis.from_url(redis_url) as client:
        client.set(spoiled, "not a hash")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = track_pb2_grpc.TrackSessionStub(channel)
            call = await open_track(stub, device)
            await call.write(batch([fix(1, 40.7, -74.0, t0)]))
            assert (await call.read()).ack.acked_seq == 1
            await until(lambda: _above_zero(failures))
            assert await server.app.history.count("default", device) == 1

            client.delete(spoiled)
            await call.write(batch([fix(2, 40.71, -74.0, t0 + 1000)]))
            assert (await call.read()).ack.acked_seq == 2
            await until(lambda: _live_seq_is(server, device, 2))
            await call.done_writing()


async def _above_zero(value) -> bool:
    return (value() or 0) > 0


async def _live_seq_is(server, device: str, seq: int) -> bool:
    positions = await server.app.pipeline.live.get("default", [device])
    return positions.seq.tolist() == [seq]


async def _is(channel: grpc.aio.Channel, service: str, status: int) -> bool:
    return await health(channel, service) == status
