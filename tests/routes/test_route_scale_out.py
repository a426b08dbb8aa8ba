"""Assigned routes across server processes and restarts: a route assigned on one
server is monitored by the server that stores the device's fixes, a cleared one by
none, a restarted server goes on, and a server that saw no fix answers progress
from the stored checkpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import polyline
import psycopg
import pytest
from tracking.v1 import common_pb2, event_pb2, route_pb2, route_pb2_grpc, track_pb2_grpc

from tests.backends import BACKENDS, backend_settings, unique_tenant
from tests.routes import support
from tests.server_fixtures import batch, embedded_settings, hello, now_ms
from tests.services import ServerProcess
from tracking_grpc.storage.base import RouteCheckpoint, StoredRoute
from tracking_grpc.storage.sqlite import SqliteHistoryStore

KAMPPI = common_pb2.LatLng(lat=60.1690, lon=24.9330)
SENATE = common_pb2.LatLng(lat=60.1750, lon=24.9502)
OFF, BACK, ARRIVED = (
    event_pb2.EVENT_TYPE_OFF_ROUTE,
    event_pb2.EVENT_TYPE_BACK_ON_ROUTE,
    event_pb2.EVENT_TYPE_ARRIVED,
)
CHECKPOINT_S = 0.2
NOT_FOUND = grpc.StatusCode.NOT_FOUND
HANG_S = 60  # a hang guard: the conditions waited for come far sooner


class Drive:
    """A device's drive along its assigned route at 10 m/s, a fix every 5 s, 300 m
    off the route from 600 to 900 m along it."""

    def __init__(self, device: str, plan: route_pb2.RoutePlan) -> None:
        self.device = device
        lat, lon = np.array(polyline.decode(plan.polyline, 6)).T
        points, self.along = support.drive(lat, lon, 10.0)
        detour = np.flatnonzero((self.along > 600) & (self.along < 900))
        self.points = support.shift(points, detour, 0.0, 300.0)
        self.start_ms = now_ms() - 5_000 * len(points) - 60_000
        self.sent = 0

    def first_at(self, along_m: float) -> int:
        """Index of the first fix at least ``along_m`` along the route."""
        return int(np.flatnonzero(self.along >= along_m)[0])

    def time_ms(self, index: int) -> int:
        return self.start_ms + index * 5_000

    async def send(
        self, channel: grpc.aio.Channel, until: int, expected: int, watched: bool = True
    ) -> list[int]:
        """Send the fixes up to index ``until`` (exclusive) not sent yet, in batches
        of 10, through ``channel``'s server; the route events (not ETA updates) its
        stream brings until every batch is acked, the server's progress covers the
        last fix sent (unless not ``watched``: the device has no route there) and
        ``expected`` route events came."""
        call = track_pb2_grpc.TrackSessionStub(channel).Track()
        await call.write(hello(self.device, want_events=True))
        await call.read()
        indices = list(range(self.sent, until))
        batches = [indices[i : i + 10] for i in range(0, len(indices), 10)]
        for rows in batches:
            fixes = [
                common_pb2.Fix(
                    seq=i + 1,
                    time_ms=self.time_ms(i),
                    lat=float(self.points[i, 0]),
                    lon=float(self.points[i, 1]),
                    accuracy_m=5,
                )
                for i in rows
            ]
            await call.write(batch(fixes))
        self.sent = until
        kinds: list[int] = []
        acks = 0

        async def read() -> None:
            nonlocal acks
            response = await call.read()
            kind = response.WhichOneof("message")
            acks += kind == "ack"
            if kind == "event" and response.event.route_id:
                if response.event.type != event_pb2.EVENT_TYPE_ETA_UPDATED:
                    kinds.append(response.event.type)

        async with asyncio.timeout(HANG_S):
            while acks < len(batches):
                await read()
            if watched:
                await until_applied(channel, self)
            while len(kinds) < expected:
                await read()
        call.cancel()
        return kinds


async def assign(channel: grpc.aio.Channel, device: str, route_id: str) -> Drive:
    answer = await route_pb2_grpc.RouteStub(channel).AssignRoute(
        route_pb2.AssignRouteRequest(
            device_id=device,
            route_id=route_id,
            route=route_pb2.ComputeRouteRequest(origin=KAMPPI, destination=SENATE),
        )
    )
    return Drive(device, answer.route)


async def progress(channel: grpc.aio.Channel, device: str) -> route_pb2.RouteProgress:
    request = route_pb2.GetRouteProgressRequest(device_id=device)
    answer = await route_pb2_grpc.RouteStub(channel).GetRouteProgress(request)
    return answer.progress


async def progress_code(channel: grpc.aio.Channel, device: str) -> grpc.StatusCode:
    try:
        await progress(channel, device)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def until_applied(channel: grpc.aio.Channel, drive: Drive) -> None:
    """Wait until ``channel``'s server tells the progress of the drive's last fix
    sent, or its arrival (from memory, or from the checkpoint of the server that
    applied it)."""
    sent_ms, device = drive.time_ms(drive.sent - 1), drive.device
    async with asyncio.timeout(HANG_S):
        # polls a server (ASYNC110: no event to wait on across processes)
        while True:
            now = await progress(channel, device)
            if now.last_fix_ms >= sent_ms or now.arrived:
                return
            await asyncio.sleep(CHECKPOINT_S / 2)


async def forget_routes(database_url: str, tenant: str) -> None:
    """Delete the tenant's stored routes: servers on the session's database load
    every stored route that has not ended at their start."""
    async with await psycopg.AsyncConnection.connect(
        database_url, autocommit=True
    ) as conn:
        await conn.execute("DELETE FROM assigned_routes WHERE tenant = %s", [tenant])


@pytest.fixture
def route_settings(tmp_path, helsinki_dir):
    return embedded_settings(
        tmp_path,
        routing_data_dir=str(helsinki_dir),
        default_tenant=unique_tenant(),
        route_checkpoint_s=CHECKPOINT_S,
    )


@pytest.fixture
async def two_servers(
    start_server, route_settings, pg_url, redis_url, redis_prefix, tmp_path
) -> AsyncIterator[tuple[grpc.aio.Channel, grpc.aio.Channel]]:
    """Channels to two servers on one PostgreSQL and Redis: the first gets the
    Route calls, the second the device's fixes."""
    shared = replace(
        route_settings,
        database_url=pg_url,
        redis_url=redis_url,
        redis_key_prefix=redis_prefix,
    )
    assigning = await start_server(settings=shared)
    storing = await start_server(
        settings=replace(shared, data_dir=str(tmp_path / "storing"))
    )
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{assigning.port}") as to_assigning,
            grpc.aio.insecure_channel(f"127.0.0.1:{storing.port}") as to_storing,
        ):
            yield to_assigning, to_storing
    finally:
        await forget_routes(pg_url, route_settings.default_tenant)


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_route_assigned_on_one_server_is_watched_where_the_fixes_go(
    two_servers,
) -> None:
    assigning, storing = two_servers
    drive = await assign(assigning, "van-1", "delivery-1")
    assert await drive.send(storing, drive.first_at(800), 1) == [OFF]
    assert await drive.send(storing, len(drive.points), 2) == [BACK, ARRIVED]


@pytest.mark.postgres
@pytest.mark.redis
async def test_progress_from_the_server_that_saw_no_fix(two_servers) -> None:
    assigning, storing = two_servers
    drive = await assign(assigning, "van-2", "delivery-2")
    assert await drive.send(storing, drive.first_at(800), 1) == [OFF]
    await until_applied(assigning, drive)  # as old as the storing server's last save
    elsewhere = await progress(assigning, "van-2")
    here = await progress(storing, "van-2")
    assert elsewhere.off_route and elsewhere.route_id == "delivery-2"
    assert elsewhere == here


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_route_cleared_on_one_server_is_not_watched_on_the_other(
    two_servers,
) -> None:
    assigning, storing = two_servers
    drive = await assign(assigning, "van-3", "delivery-3")
    assert await drive.send(storing, drive.first_at(800), 1) == [OFF]
    cleared = await route_pb2_grpc.RouteStub(assigning).ClearRoute(
        route_pb2.ClearRouteRequest(device_id="van-3")
    )
    assert cleared.cleared
    async with asyncio.timeout(HANG_S):  # the storing server hears the notice
        while await progress_code(storing, "van-3") != NOT_FOUND:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    # No BACK or ARRIVED among what comes until the last ack, and no route again.
    assert await drive.send(storing, len(drive.points), 0, watched=False) == []
    assert await progress_code(storing, "van-3") == NOT_FOUND
    assert await progress_code(assigning, "van-3") == NOT_FOUND


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_device_moving_between_servers_continues_where_it_was(
    two_servers,
) -> None:
    first, second = two_servers
    drive = await assign(first, "van-5", "delivery-5")
    assert await drive.send(first, drive.first_at(500), 0) == []
    await until_applied(second, drive)
    assert not (await progress(second, "van-5")).off_route
    assert await drive.send(second, drive.first_at(800), 1) == [OFF]
    await until_applied(first, drive)  # the first let go: it reads the checkpoint
    assert await drive.send(first, len(drive.points), 2) == [BACK, ARRIVED]


@pytest.fixture(params=BACKENDS)
def on_backend(request, route_settings):
    """The route settings on each backend."""
    return backend_settings(request, route_settings)


async def test_a_restarted_server_goes_on_monitoring(start_server, on_backend) -> None:
    settings = on_backend
    try:
        first = await start_server(settings=settings)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            drive = await assign(channel, "van-4", "delivery-4")
            assert await drive.send(channel, drive.first_at(400), 0) == []
            assert not (await progress(channel, "van-4")).off_route
        await first.stop()
        second = await start_server(settings=settings)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            assert (await progress(channel, "van-4")).last_fix_ms == drive.time_ms(
                drive.sent - 1
            )
            kinds = await drive.send(channel, len(drive.points), 3)
            assert kinds == [OFF, BACK, ARRIVED]
            assert (await progress(channel, "van-4")).arrived
    finally:
        if settings.database_url:
            await forget_routes(settings.database_url, settings.default_tenant)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_server_processes_share_routes_and_a_crash_loses_no_route(
    production_env, helsinki_dir
) -> None:
    """Two ``tracking serve`` processes: the route assigned on one raises OFF_ROUTE
    on the other, which is then killed and started again (SIGKILL: no save at
    stop) and goes on from its last checkpoint."""
    env = {
        **production_env,
        "TRACKING_ROUTING_DATA_DIR": str(helsinki_dir),
        "TRACKING_ROUTE_CHECKPOINT_S": str(CHECKPOINT_S),
        "TRACKING_DEFAULT_TENANT": unique_tenant(),
    }
    assigning, storing = ServerProcess(env), ServerProcess(env)
    try:
        for server in (assigning, storing):
            server.start()
        async with grpc.aio.insecure_channel(assigning.address) as to_assigning:
            drive = await assign(to_assigning, "van-6", "delivery-6")
            async with grpc.aio.insecure_channel(storing.address) as to_storing:
                assert await drive.send(to_storing, drive.first_at(800), 1) == [OFF]
            await until_applied(to_assigning, drive)  # read from the store there
        storing.kill()
        storing.start()
        async with grpc.aio.insecure_channel(storing.address) as channel:
            kinds = await drive.send(channel, len(drive.points), 2)
            assert kinds == [BACK, ARRIVED]
    finally:
        for server in (assigning, storing):
            server.stop()
        await forget_routes(
            env["TRACKING_DATABASE_URL"], env["TRACKING_DEFAULT_TENANT"]
        )


async def test_a_stored_route_that_cannot_be_read_is_left_out(
    start_server, route_settings
) -> None:
    path = Path(route_settings.data_dir) / "history.sqlite3"
    store = await SqliteHistoryStore.open(path)
    tenant = route_settings.default_tenant
    checkpoint = RouteCheckpoint(tenant, "van-8", "broken", 1, 0, b"")
    await store.assign_route(StoredRoute(b"P", checkpoint))
    await store.close()
    server = await start_server(settings=route_settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        drive = await assign(channel, "van-7", "delivery-7")
        kinds = await drive.send(channel, len(drive.points), 3)
        assert kinds == [OFF, BACK, ARRIVED]


async def test_a_failed_route_load_holds_up_neither_fixes_nor_the_stop(
    start_server, route_settings, monkeypatch
) -> None:
    async def broken(self: SqliteHistoryStore) -> list[StoredRoute]:
        raise RuntimeError("a bug in the load")

    monkeypatch.setattr(SqliteHistoryStore, "monitored_routes", broken)
    server = await start_server(settings=route_settings)
    async with (
        asyncio.timeout(HANG_S),
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        drive = await assign(channel, "van-9", "delivery-9")
        kinds = await drive.send(channel, len(drive.points), 3)
        assert kinds == [OFF, BACK, ARRIVED]
        await server.stop()
