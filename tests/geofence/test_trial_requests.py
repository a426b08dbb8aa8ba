"""Geofence requests a new user's trial sent, against a real server on port 0: each
answer names the field and the reason."""

from __future__ import annotations

import grpc
import pytest
from tracking.v1 import geofence_pb2, geofence_pb2_grpc

from tests.server_fixtures import violation

WHOLE_WORLD = "POLYGON((-180 -90, 180 -90, 180 90, -180 90, -180 -90))"


@pytest.fixture
def fences(channel) -> geofence_pb2_grpc.GeofenceStub:
    return geofence_pb2_grpc.GeofenceStub(channel)


def wkt_fence(fence_id: str, wkt: str, **extra) -> geofence_pb2.Fence:
    shape = geofence_pb2.FenceShape(wkt=wkt)
    return geofence_pb2.Fence(fence_id=fence_id, shape=shape, **extra)


async def refused(call) -> tuple[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return violation(caught.value)


async def test_a_whole_world_fence_says_why(fences) -> None:
    """Its ±180 edges are one meridian: the answer says so, not "0.06 m²"."""
    request = geofence_pb2.CreateFenceRequest(fence=wkt_fence("world", WHOLE_WORLD))
    field, reason = await refused(fences.CreateFence(request))
    assert field == "fence.shape.wkt[0]"
    assert "spans all 360° of longitude" in reason
    assert "cannot cover the whole world or both poles" in reason
