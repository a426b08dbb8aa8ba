"""Time inside geofences, as a core function and through the History service."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tracking.v1 import (
    common_pb2,
    geofence_pb2,
    geofence_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
    track_pb2_grpc,
)

from tests.activity.helpers import track
from tests.activity.test_history_rpc import publish
from tracking_grpc.activity.fencetime import time_in_fences
from tracking_grpc.geofence.index import FenceIndex
from tracking_grpc.geofence.model import FenceSpec, ShapeSpec

HOME = FenceSpec("home", ShapeSpec.circle(47.0, 8.0, 100.0))
SHOP = FenceSpec("shop", ShapeSpec.circle(47.0, 8.0 + 1000 / 75_830, 100.0))


def visit_twice():
    """At home 10 min, to the shop (1 km) and 10 min there, back home 10 min."""
    east = np.concatenate(
        [
            np.zeros(60),
            np.arange(1, 11) * 100.0,
            np.full(60, 1000.0),
            1000.0 - np.arange(1, 11) * 100.0,
            np.zeros(60),
        ]
    )
    return track(east, np.zeros(east.size), 10.0)


def test_time_inside_each_fence_and_visits():
    f = visit_twice()
    times = time_in_fences(FenceIndex.build([HOME, SHOP]), f.time_ms, f.lat, f.lon, 900)
    by_id = {t.fence_id: t for t in times}
    assert by_id["home"].visit_count == 2 and by_id["shop"].visit_count == 1
    # 59 + 59 full steps at home plus half steps at each crossing: about 20 min.
    assert by_id["home"].inside_s == pytest.approx(1200, abs=30)
    assert by_id["shop"].inside_s == pytest.approx(620, abs=30)


def test_silence_counts_nothing():
    f = track(np.zeros(3), np.zeros(3), 3600.0)
    times = time_in_fences(FenceIndex.build([HOME]), f.time_ms, f.lat, f.lon, 900)
    assert (times[0].inside_s, times[0].visit_count) == (0.0, 1)


async def create_circles(channel, specs) -> None:
    fences = geofence_pb2_grpc.GeofenceStub(channel)
    for spec in specs:
        circle = common_pb2.Circle(
            center=common_pb2.LatLng(lat=spec.shape.lat, lon=spec.shape.lon),
            radius_m=spec.shape.radius_m,
        )
        await fences.CreateFence(
            geofence_pb2.CreateFenceRequest(
                fence=geofence_pb2.Fence(
                    fence_id=spec.fence_id,
                    shape=geofence_pb2.FenceShape(circle=circle),
                )
            )
        )


def time_in(f, *fence_ids: str) -> history_pb2.TimeInFencesRequest:
    return history_pb2.TimeInFencesRequest(
        device_id="d",
        start_ms=int(f.time_ms[0]),
        end_ms=int(f.time_ms[-1]) + 1,
        fence_ids=list(fence_ids),
    )


async def test_time_in_fences_rpc(start_server):
    server = await start_server(max_fix_age_s=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await create_circles(channel, (HOME, SHOP))
        f = visit_twice()
        await publish(track_pb2_grpc.TrackSessionStub(channel), f)
        stub = history_pb2_grpc.HistoryStub(channel)
        response = await stub.TimeInFences(time_in(f, "shop"))
        # A mistyped id answered an empty list, as if the device had never been in
        # the fence.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.TimeInFences(time_in(f, "shop", "shopp"))
    assert [t.fence_id for t in response.fences] == ["shop"]
    assert response.fences[0].inside_s == pytest.approx(620, abs=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "fence_ids" in raised.value.details()
    assert "'shopp'" in raised.value.details()


async def test_time_in_fences_reuses_the_fence_index_until_fences_change(
    start_server, monkeypatch
):
    """Calls share the geofence processor's index of the tenant's fences; a call
    used to build one of its own on the event loop (seconds for 20,000 fences,
    every other call waiting)."""
    built = []
    build = FenceIndex.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        build(self, *args, **kwargs)

    server = await start_server(max_fix_age_s=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await create_circles(channel, (HOME,))
        f = visit_twice()
        await publish(track_pb2_grpc.TrackSessionStub(channel), f)
        stub = history_pb2_grpc.HistoryStub(channel)
        await stub.TimeInFences(time_in(f))
        monkeypatch.setattr(FenceIndex, "__init__", counted)
        for _ in range(3):
            response = await stub.TimeInFences(time_in(f))
        assert ([t.fence_id for t in response.fences], built) == (["home"], [])
        await create_circles(channel, (SHOP,))
        response = await stub.TimeInFences(time_in(f))
    assert sorted(t.fence_id for t in response.fences) == ["home", "shop"]
    assert built == [1]
