"""EraseDevice answered by one server process clears the device's in-process state
in another that shares PostgreSQL and Redis: its live activity and its geofence
memberships (the next fix in a fence raises ENTER again)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from tracking.v1 import (
    common_pb2,
    event_pb2,
    geofence_pb2,
    geofence_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
    track_pb2_grpc,
)

from tests.server_fixtures import Metadata, bearer, fix, track_session
from tests.services import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

SECRET = "erase-across-processes-secret-of-enough-length"
DEPOT = common_pb2.LatLng(lat=60.17, lon=24.94)


@pytest.fixture
def two_servers(production_env):
    env = {
        **production_env,
        "TRACKING_AUTH_MODE": "jwt",
        "TRACKING_JWT_HS256_SECRET": SECRET,
    }
    started = [ServerProcess(env), ServerProcess(env)]
    try:
        for server in started:
            server.start()
        yield started
    finally:
        for server in started:
            server.stop()


def as_admin(tenant: str) -> Metadata:
    return bearer(SECRET, tenant, "admin")


async def activity_code(channel: grpc.aio.Channel, tenant: str) -> grpc.StatusCode:
    try:
        await history_pb2_grpc.HistoryStub(channel).GetActivity(
            history_pb2.GetActivityRequest(device_id="van"), metadata=as_admin(tenant)
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def stored(
    channel: grpc.aio.Channel, tenant: str, kind: int = event_pb2.EVENT_TYPE_ENTER
) -> int:
    """How many events of the van of type ``kind`` are stored."""
    request = geofence_pb2.ListEventsRequest(start_ms=0, device_id="van", types=[kind])
    found = await geofence_pb2_grpc.GeofenceStub(channel).ListEvents(
        request, metadata=as_admin(tenant)
    )
    return len(found.events)


async def until(check, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - polls another process
            await asyncio.sleep(0.05)


async def van_in_depot(channel: grpc.aio.Channel, tenant: str) -> None:
    """Five fixes of the van inside the depot, through ``channel``'s process."""
    fixes = [fix(seq, 60.17, 24.94, accuracy_m=5) for seq in range(1, 6)]
    stub = track_pb2_grpc.TrackSessionStub(channel)
    await track_session(stub, "van", [fixes], metadata=as_admin(tenant))


async def test_an_erasure_clears_the_state_of_every_process(two_servers) -> None:
    answering, holding = two_servers
    tenant = f"erase-{uuid.uuid4().hex[:8]}"
    async with (
        grpc.aio.insecure_channel(answering.address) as to_answering,
        grpc.aio.insecure_channel(holding.address) as to_holding,
    ):
        fence = geofence_pb2.Fence(
            fence_id="depot",
            shape=geofence_pb2.FenceShape(
                circle=common_pb2.Circle(center=DEPOT, radius_m=300)
            ),
        )
        await geofence_pb2_grpc.GeofenceStub(to_holding).CreateFence(
            geofence_pb2.CreateFenceRequest(fence=fence), metadata=as_admin(tenant)
        )
        await van_in_depot(to_holding, tenant)
        await until(lambda: _is(activity_code(to_holding, tenant), grpc.StatusCode.OK))
        await until(lambda: _is(stored(to_holding, tenant), 1))
        online = event_pb2.EVENT_TYPE_ONLINE
        await until(lambda: _is(stored(to_holding, tenant, online), 1))

        erased = await history_pb2_grpc.HistoryStub(to_answering).EraseDevice(
            history_pb2.EraseDeviceRequest(device_id="van"), metadata=as_admin(tenant)
        )

        # Its ENTER and its ONLINE.
        assert erased.fixes_erased == 5 and erased.events_erased == 2
        assert not erased.activity_erased  # the answering process never saw it
        await until(
            lambda: _is(activity_code(to_holding, tenant), grpc.StatusCode.NOT_FOUND)
        )
        await van_in_depot(to_holding, tenant)  # seq from 1 again: it was erased
        await until(lambda: _is(stored(to_holding, tenant), 1))


async def _is(value, expected) -> bool:
    return await value == expected
