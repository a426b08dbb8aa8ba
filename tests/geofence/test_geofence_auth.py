"""Roles and tenants on the Geofence service (JWT, real server)."""

from __future__ import annotations

import time

import grpc
import pytest
from tracking.v1 import geofence_pb2, geofence_pb2_grpc

from tests.geofence.support import DEPOT
from tests.test_auth import SECRET, bearer, expires_while_idle, token


@pytest.fixture
async def stub(start_server):
    server = await start_server(auth_mode="jwt", jwt_hs256_secret=SECRET)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield geofence_pb2_grpc.GeofenceStub(channel)


def create(fence_id: str = "depot") -> geofence_pb2.CreateFenceRequest:
    return geofence_pb2.CreateFenceRequest(
        fence=geofence_pb2.Fence(fence_id=fence_id, shape=DEPOT)
    )


@pytest.mark.parametrize(
    ("role", "code"),
    [
        ("viewer", grpc.StatusCode.PERMISSION_DENIED),
        ("device", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_only_admins_write_fences(stub, role, code) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateFence(create(), metadata=bearer(token(role)))
    assert caught.value.code() == code


async def test_missing_token_is_unauthenticated(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListFences(geofence_pb2.ListFencesRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_tenants_see_only_their_fences(stub) -> None:
    await stub.CreateFence(create(), metadata=bearer(token("admin", tenant="acme")))
    other = await stub.ListFences(
        geofence_pb2.ListFencesRequest(), metadata=bearer(token("viewer", tenant="b"))
    )
    mine = await stub.ListFences(
        geofence_pb2.ListFencesRequest(),
        metadata=bearer(token("viewer", tenant="acme")),
    )
    assert (len(other.fences), len(mine.fences)) == (0, 1)


async def test_watch_events_ends_when_its_token_expires(stub) -> None:
    short = token("viewer", sub="v", exp=time.time() + 1.5)
    call = stub.WatchEvents(geofence_pb2.WatchEventsRequest(), metadata=bearer(short))
    assert await expires_while_idle(call) == grpc.StatusCode.UNAUTHENTICATED
