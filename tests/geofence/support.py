"""Shared helpers for geofence tests: field-case fences and fixes as domain objects,
a watch hub that records what its feed handed it, and two servers on one set of
backends with a WatchEvents on the first."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np
from tracking.v1 import (
    common_pb2,
    event_pb2,
    geofence_pb2,
    geofence_pb2_grpc,
    track_pb2_grpc,
)

from tests.server_fixtures import batch, fix, hello, now_ms
from tracking_grpc.config import Settings
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import TrackingEvent
from tracking_grpc.geofence.delivery import EventWatchHub
from tracking_grpc.geofence.detector import FenceDetector
from tracking_grpc.geofence.index import FenceIndex
from tracking_grpc.geofence.model import FenceSpec, ShapeSpec

TENANT = "t-geo"
NOW_MS = 1_900_000_000_000
# A 100 m circle in Berlin, as a FenceShape message.
DEPOT = geofence_pb2.FenceShape(
    circle=common_pb2.Circle(
        center=common_pb2.LatLng(lat=52.52, lon=13.405), radius_m=100
    )
)


def time_ms(ts: str) -> int:
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


def case_fence(fence: dict, **settings) -> FenceSpec:
    """A field case's fence as a FenceSpec (circle or GeoJSON polygon)."""
    if fence["type"] == "circle":
        centre = fence["center"]
        shape = ShapeSpec.circle(centre["lat"], centre["lon"], fence["radius_m"])
    else:
        shape = ShapeSpec.geojson(json.dumps(fence["geometry"]))
    return FenceSpec(fence["id"], shape, **settings)


def case_batch(fixes: list[dict]) -> FixBatch:
    """Fixes in arrival (seq) order."""
    fixes = sorted(fixes, key=lambda f: f["seq"])
    return FixBatch.from_columns(
        TENANT,
        [f["device"] for f in fixes],
        [f["seq"] for f in fixes],
        [time_ms(f["ts"]) for f in fixes],
        [f["lat"] for f in fixes],
        [f["lon"] for f in fixes],
        accuracy_m=[
            np.nan if f.get("accuracy_m") is None else f["accuracy_m"] for f in fixes
        ],
    )


def replay(
    specs: list[FenceSpec], batch: FixBatch, one_by_one: bool = True
) -> list[TrackingEvent]:
    """Events from feeding the fixes to a detector, one per batch or all at once."""
    index = FenceIndex.build(specs)
    detector = FenceDetector(TENANT)
    if not one_by_one:
        return detector.evaluate(batch, index, NOW_MS)
    events = []
    for i in range(len(batch)):
        events += detector.evaluate(batch.take(np.array([i])), index, NOW_MS)
    return events


def summary(events: list[TrackingEvent]) -> list[tuple[str, int]]:
    return [(e.type.name, e.fix_seq) for e in events]


class RecordingHub(EventWatchHub):
    """An event watch hub that remembers every event the feed handed it."""

    def __init__(self) -> None:
        super().__init__(fed_by_stream=True)
        self.seen: list[TrackingEvent] = []

    async def __call__(self, events) -> None:
        self.seen += events
        await super().__call__(events)


@contextlib.asynccontextmanager
async def depot_watched_elsewhere(
    start_server: Callable[..., Awaitable],
    settings: Settings,
    device_ids: Sequence[str],
    busy_dir: Path,
) -> AsyncIterator[
    tuple[geofence_pb2_grpc.GeofenceStub, grpc.aio.UnaryStreamCall, grpc.aio.Channel]
]:
    """Two servers on the same backends (the second with its data in
    ``busy_dir``): the DEPOT fence and a WatchEvents of ``device_ids`` on the
    first. Yields the first's Geofence stub, the open watch and a channel to the
    second, where the fixes go."""
    watched = await start_server(settings=settings)
    busy = await start_server(settings=replace(settings, data_dir=str(busy_dir)))
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{watched.port}") as to_watched,
        grpc.aio.insecure_channel(f"127.0.0.1:{busy.port}") as to_busy,
    ):
        fences = geofence_pb2_grpc.GeofenceStub(to_watched)
        await fences.CreateFence(
            geofence_pb2.CreateFenceRequest(
                fence=geofence_pb2.Fence(fence_id="depot", shape=DEPOT)
            )
        )
        request = geofence_pb2.WatchEventsRequest(device_ids=list(device_ids))
        watch = fences.WatchEvents(request)
        await watch.initial_metadata()
        try:
            yield fences, watch, to_busy
        finally:
            watch.cancel()


async def enter_depot(channel: grpc.aio.Channel, device: str) -> event_pb2.Event:
    """The ENTER that a fix of ``device`` in the DEPOT raises, as its stream hears
    it."""
    call = track_pb2_grpc.TrackSessionStub(channel).Track()
    await call.write(hello(device, want_events=True))
    await call.read()
    await call.write(batch([fix(1, 52.52, 13.405, now_ms() - 60_000)]))
    while True:
        response = await asyncio.wait_for(call.read(), 10)
        if response.WhichOneof("message") == "event" and response.event.fence_id:
            await call.done_writing()
            return response.event
