"""DWELL from the timer through a real server on port 0: a device enters a fence and
stops sending; the event reaches WatchEvents and ListEvents, once, across a restart."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from tracking.v1 import event_pb2, geofence_pb2, geofence_pb2_grpc, track_pb2_grpc

from tests.geofence.support import DEPOT
from tests.geofence.test_geofence_rpc import BACKENDS, backend_settings
from tests.server_fixtures import fix, now_ms, track_session
from tracking_grpc.config import Settings

DWELL_MS = 1_500
PROMPT_S = 0.5  # dwell_lateness_s of a server that raises DWELL soon
NEVER_S = 3_600.0  # of one that leaves it to the next server
BOUND_S = 20  # a DWELL is due about 3 s after the fix; this is the wait's bound
INSIDE, FAR = (52.52, 13.405), (52.52, 13.4123)


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    return backend_settings(request, tmp_path)


async def serve(start_server, settings: Settings, lateness_s: float, first=True):
    """A server and a channel to it; the first creates the fence ``depot``, which
    raises DWELL (the next ones find it stored)."""
    server = await start_server(settings=replace(settings, dwell_lateness_s=lateness_s))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    fences = geofence_pb2_grpc.GeofenceStub(channel)
    if first:
        fence = geofence_pb2.Fence(fence_id="depot", shape=DEPOT, dwell_ms=DWELL_MS)
        await fences.CreateFence(geofence_pb2.CreateFenceRequest(fence=fence))
    return server, channel, fences


async def send(channel, device: str, *fixes) -> None:
    """Send fixes on a stream, wait for their ack, close the stream."""
    stub = track_pb2_grpc.TrackSessionStub(channel)
    _, acks = await track_session(stub, device, [list(fixes)])
    assert acks[0].stored == len(fixes)


async def listed(fences, device: str, wanted: list[int]) -> list:
    """The device's stored events once their types are ``wanted`` (the store writes
    in the background); fails after BOUND_S."""
    request = geofence_pb2.ListEventsRequest(
        start_ms=now_ms() - 3_600_000, end_ms=now_ms() + 3_600_000, device_id=device
    )
    for _ in range(BOUND_S * 10):
        events = list((await fences.ListEvents(request)).events)
        if [e.type for e in events] == wanted:
            return events
        await asyncio.sleep(0.1)
    pytest.fail(f"events {[e.type for e in events]} of {device}, not {wanted}")


ENTER, DWELL, EXIT = (
    event_pb2.EVENT_TYPE_ENTER,
    event_pb2.EVENT_TYPE_DWELL,
    event_pb2.EVENT_TYPE_EXIT,
)


async def test_a_device_that_stops_sending_gets_its_dwell(
    start_server, settings
) -> None:
    _, channel, fences = await serve(start_server, settings, PROMPT_S)
    watch = fences.WatchEvents(geofence_pb2.WatchEventsRequest(types=[DWELL]))
    await watch.initial_metadata()
    entered_ms = now_ms()
    await send(channel, "parked-1", fix(1, *INSIDE, entered_ms, accuracy_m=5))

    watched = await asyncio.wait_for(watch.read(), BOUND_S)
    (event,) = watched.events
    assert (event.device_id, event.fence_id) == ("parked-1", "depot")
    assert event.time_ms == entered_ms + DWELL_MS and event.fix_seq == 1
    assert event.attributes["inside_ms"] == str(DWELL_MS)
    watch.cancel()
    await listed(fences, "parked-1", [ENTER, DWELL])

    await send(channel, "parked-1", fix(2, *INSIDE, now_ms(), accuracy_m=5))
    await send(channel, "parked-1", fix(3, *FAR, now_ms() + 1, accuracy_m=5))
    await listed(fences, "parked-1", [ENTER, DWELL, EXIT])  # no second DWELL
    await channel.close()


async def test_a_restart_raises_the_dwell_its_predecessor_had_not(
    start_server, settings
) -> None:
    server, channel, fences = await serve(start_server, settings, NEVER_S)
    entered_ms = now_ms()
    await send(channel, "parked-2", fix(1, *INSIDE, entered_ms, accuracy_m=5))
    await listed(fences, "parked-2", [ENTER])
    await channel.close()
    await server.stop(1)

    _, channel, fences = await serve(start_server, settings, PROMPT_S, False)
    enter, dwell = await listed(fences, "parked-2", [ENTER, DWELL])
    assert dwell.time_ms == entered_ms + DWELL_MS
    assert (dwell.position, dwell.fix_seq) == (enter.position, 1)
    await channel.close()


async def test_a_restart_does_not_raise_a_dwell_again(start_server, settings) -> None:
    server, channel, fences = await serve(start_server, settings, PROMPT_S)
    await send(channel, "parked-3", fix(1, *INSIDE, now_ms(), accuracy_m=5))
    await listed(fences, "parked-3", [ENTER, DWELL])
    await channel.close()
    await server.stop(1)

    _, channel, fences = await serve(start_server, settings, PROMPT_S, False)
    await send(channel, "parked-3", fix(2, *INSIDE, now_ms(), accuracy_m=5))
    await asyncio.sleep(3 * PROMPT_S + DWELL_MS / 1000)  # a timer would be due
    await send(channel, "parked-3", fix(3, *FAR, now_ms(), accuracy_m=5))
    await listed(fences, "parked-3", [ENTER, DWELL, EXIT])
    await channel.close()
