"""EraseDevice while the device's fixes are stored and acked but still wait for the
event processors, through a real server on the embedded and the production
backends: the processors drop them, so nothing of the device from before the
erasure comes back (activity, memberships, events, checkpoint, live position),
and a fix it sends after the erasure is processed as new data. With PostgreSQL and
Redis, another server process holding such fixes drops them too when it hears the
erasure notice.

The processors run at most every ``processor_interval_ms``: a long interval keeps
the second part of the trace queued for them while the erasure runs (checked, not
assumed)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import psycopg
import pytest
from tracking.v1 import (
    common_pb2,
    geofence_pb2,
    geofence_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
    track_pb2,
    track_pb2_grpc,
)

from tests.backends import BACKENDS, backend_settings, unique_tenant
from tests.server_fixtures import (
    Metadata,
    batch,
    bearer,
    embedded_settings,
    fix,
    hello,
    until,
)
from tests.server_fixtures import track_session as send
from tracking_grpc.config import Settings
from tracking_grpc.events import EventType
from tracking_grpc.server import TrackingServer

SECRET = "erase-queued-fixes-secret-of-enough-length"
DEPOT = common_pb2.LatLng(lat=60.17, lon=24.94)
PROCESSOR_INTERVAL_MS = 6_000.0  # the queue outlasts the erasure
HANG_GUARD_S = 60.0  # a safety net against a hang, not a measure


def as_admin(tenant: str) -> Metadata:
    return bearer(SECRET, tenant, "admin")


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.track = track_pb2_grpc.TrackSessionStub(channel)
        self.history = history_pb2_grpc.HistoryStub(channel)
        self.geofence = geofence_pb2_grpc.GeofenceStub(channel)


@pytest.fixture(params=BACKENDS)
async def served(
    request: pytest.FixtureRequest, start_server, tmp_path: Path
) -> AsyncIterator[tuple[TrackingServer, Stubs]]:
    settings = embedded_settings(
        tmp_path,
        auth_mode="jwt",
        jwt_hs256_secret=SECRET,
        activity_checkpoint_s=600,  # saved when the test says
        processor_interval_ms=PROCESSOR_INTERVAL_MS,
    )
    server = await start_server(settings=backend_settings(request, settings))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, Stubs(channel)


async def van_events(stubs: Stubs, tenant: str) -> list[str]:
    """The types of the van's stored events, of every kind."""
    request = geofence_pb2.ListEventsRequest(
        start_ms=0, device_id="van", types=[int(kind) for kind in EventType]
    )
    found = await stubs.geofence.ListEvents(request, metadata=as_admin(tenant))
    return sorted(EventType(event.type).name for event in found.events)


async def activity_code(stubs: Stubs, tenant: str) -> grpc.StatusCode:
    try:
        await stubs.history.GetActivity(
            history_pb2.GetActivityRequest(device_id="van"), metadata=as_admin(tenant)
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def store_settings(tmp_path: Path, pg_url: str, **more: object) -> Settings:
    """PostgreSQL history that gives up on a locked table after half a second."""
    return replace(
        embedded_settings(tmp_path, auth_mode="jwt", jwt_hs256_secret=SECRET),
        database_url=pg_url,
        database_timeout_s=0.5,
        **more,
    )


@contextlib.asynccontextmanager
async def fixes_locked(pg_url: str) -> AsyncIterator[None]:
    """The fixes table locked by another connection: the server's history store
    is away until the block ends."""
    async with await psycopg.AsyncConnection.connect(pg_url) as locker:
        await locker.execute("LOCK TABLE fixes IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await locker.rollback()


async def processed(server: TrackingServer) -> None:
    """Until every stored fix has been through the processors."""
    await until(lambda: server.app.pipeline.idle)


async def depot_then_outside_and_inside(
    server: TrackingServer, stubs: Stubs, tenant: str
) -> None:
    """The depot fence; the van north of it, then driving into it: the first part
    goes through the processors at once (their first run), the second waits for
    their next."""
    fence = geofence_pb2.Fence(
        fence_id="depot",
        shape=geofence_pb2.FenceShape(
            circle=common_pb2.Circle(center=DEPOT, radius_m=300)
        ),
    )
    await stubs.geofence.CreateFence(
        geofence_pb2.CreateFenceRequest(fence=fence), metadata=as_admin(tenant)
    )
    outside = [fix(seq, 60.18 - seq * 0.001, 24.94, accuracy_m=5) for seq in (1, 2)]
    inside = [fix(seq, 60.17, 24.94, accuracy_m=5) for seq in range(3, 8)]
    await send(stubs.track, "van", [outside], metadata=as_admin(tenant))
    await processed(server)
    assert await van_events(stubs, tenant) == ["ONLINE"]
    await send(stubs.track, "van", [inside], metadata=as_admin(tenant))
    assert not server.app.pipeline.idle  # the second part waits for the processors


async def test_fixes_queued_for_the_processors_at_an_erasure_bring_nothing_back(
    served,
) -> None:
    server, stubs = served
    tenant = unique_tenant()
    await depot_then_outside_and_inside(server, stubs, tenant)

    erased = await stubs.history.EraseDevice(
        history_pb2.EraseDeviceRequest(device_id="van"), metadata=as_admin(tenant)
    )

    assert not server.app.pipeline.idle, "the processors ran before the erasure"
    assert (erased.fixes_erased, erased.events_erased) == (7, 1)
    assert erased.activity_erased
    await processed(server)
    assert await van_events(stubs, tenant) == []
    assert await activity_code(stubs, tenant) == grpc.StatusCode.NOT_FOUND
    assert await server.app.activity.save_checkpoints() == 0
    stored = await server.app.history.load_checkpoints(tenant, ["van"])
    assert stored.devices == []
    last = await stubs.track.GetLastPositions(
        track_pb2.GetLastPositionsRequest(device_ids=["van"]), metadata=as_admin(tenant)
    )
    assert list(last.positions) == []

    # Sent after the erasure: new data, processed as such (its membership in the
    # depot was forgotten, so it enters it again).
    _, acks = await send(
        stubs.track, "van", [[fix(1, 60.17, 24.94, accuracy_m=5)]], as_admin(tenant)
    )
    assert acks[0].stored == 1
    await processed(server)
    assert await van_events(stubs, tenant) == ["ENTER", "ONLINE"]
    assert await activity_code(stubs, tenant) == grpc.StatusCode.OK


@pytest.mark.postgres
@pytest.mark.redis
async def test_another_process_drops_its_queued_fixes_of_an_erased_device(
    start_server, tmp_path: Path, pg_url: str, redis_url: str, redis_prefix: str
) -> None:
    base = replace(
        embedded_settings(tmp_path, auth_mode="jwt", jwt_hs256_secret=SECRET),
        database_url=pg_url,
        redis_url=redis_url,
        redis_key_prefix=redis_prefix,
        activity_checkpoint_s=600,
    )
    erasing = await start_server(settings=base)
    holding = await start_server(
        settings=replace(base, processor_interval_ms=PROCESSOR_INTERVAL_MS)
    )
    tenant = unique_tenant()
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{erasing.port}") as to_erasing,
        grpc.aio.insecure_channel(f"127.0.0.1:{holding.port}") as to_holding,
    ):
        stubs = Stubs(to_holding)
        await depot_then_outside_and_inside(holding, stubs, tenant)
        await Stubs(to_erasing).history.EraseDevice(
            history_pb2.EraseDeviceRequest(device_id="van"), metadata=as_admin(tenant)
        )
        # until it hears the notice
        await until(lambda: holding.app.activity.state(tenant, "van") is None)
        assert not holding.app.pipeline.idle, "the processors ran before the notice"
        await processed(holding)

        assert await van_events(stubs, tenant) == []
        assert await activity_code(stubs, tenant) == grpc.StatusCode.NOT_FOUND
        assert await holding.app.activity.save_checkpoints() == 0


@pytest.mark.postgres
async def test_an_erasure_does_not_wait_for_a_store_that_is_away(
    start_server, tmp_path: Path, pg_url: str
) -> None:
    """The device's fixes cannot be stored (a lock holds the fixes table): the
    erasure answers UNAVAILABLE, having erased nothing, instead of waiting for
    them; called again once the store is back, it erases them."""
    settings = store_settings(tmp_path, pg_url)
    server = await start_server(settings=settings)
    tenant = unique_tenant()
    erase = history_pb2.EraseDeviceRequest(device_id="van")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stubs = Stubs(channel)
        call = stubs.track.Track(metadata=as_admin(tenant))
        await call.write(hello("van"))
        await call.read()  # started
        async with fixes_locked(pg_url):
            await call.write(batch([fix(1, 60.17, 24.94)]))
            await until(lambda: server.app.pipeline.admission.pending > 0)  # queued
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stubs.history.EraseDevice(
                    erase, metadata=as_admin(tenant), timeout=HANG_GUARD_S
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert caught.value.details().endswith("nothing was erased")
        ack = await call.read()
        while ack.WhichOneof("message") != "ack":
            ack = await call.read()
        assert ack.ack.stored == 1  # stored once the store is back
        await call.done_writing()
        erased = await stubs.history.EraseDevice(erase, metadata=as_admin(tenant))
    assert erased.fixes_erased == 1


@pytest.mark.postgres
async def test_an_erasure_of_a_device_with_nothing_queued_tells_the_store_is_away(
    start_server, tmp_path: Path, pg_url: str
) -> None:
    """Another device's fixes wait for the store (a lock holds the fixes table):
    the erasure of the van, which has none waiting, answers UNAVAILABLE saying
    the store is away and nothing was erased, not that the van's fixes wait."""
    settings = store_settings(tmp_path, pg_url)
    server = await start_server(settings=settings)
    tenant = unique_tenant()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stubs = Stubs(channel)
        call = stubs.track.Track(metadata=as_admin(tenant))
        await call.write(hello("truck"))
        await call.read()  # started
        async with fixes_locked(pg_url):
            await call.write(batch([fix(1, 60.17, 24.94)]))
            await until(lambda: not server.app.pipeline.storage_healthy)  # away
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stubs.history.EraseDevice(
                    history_pb2.EraseDeviceRequest(device_id="van"),
                    metadata=as_admin(tenant),
                    timeout=HANG_GUARD_S,
                )
        await call.done_writing()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == (
        "the history store is unavailable; nothing was erased"
    )


@pytest.mark.postgres
async def test_an_erasure_that_fails_drops_none_of_the_queued_fixes(
    start_server, tmp_path: Path, pg_url: str
) -> None:
    """The van's fixes are stored and wait for the processors; its erasure finds
    the history store away (a lock holds the fixes table) and answers
    UNAVAILABLE, having erased nothing: the processors still get those fixes."""
    settings = store_settings(
        tmp_path,
        pg_url,
        activity_checkpoint_s=600,
        processor_interval_ms=PROCESSOR_INTERVAL_MS,
    )
    server = await start_server(settings=settings)
    tenant = unique_tenant()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stubs = Stubs(channel)
        await depot_then_outside_and_inside(server, stubs, tenant)
        async with fixes_locked(pg_url):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stubs.history.EraseDevice(
                    history_pb2.EraseDeviceRequest(device_id="van"),
                    metadata=as_admin(tenant),
                    timeout=HANG_GUARD_S,
                )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not server.app.pipeline.idle, "the processors ran before the erasure"
        await processed(server)
        assert await van_events(stubs, tenant) == ["ENTER", "ONLINE"]
