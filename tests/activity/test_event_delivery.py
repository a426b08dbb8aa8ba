"""Activity events reach event listeners as geofence events do: WatchEvents live,
ListEvents from the event store, gone with an erased device, coarse for a coarse
caller; on the embedded and the production backends (there through the Redis
Stream), with a real trace.

OFFLINE comes from the processor's tick once the device has sent nothing for
offline_after_s, counted from when its fixes arrived: 4 s here, longer than the
trace takes to process (under 2 s), so that it closes the trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tracking.v1 import (
    common_pb2,
    event_pb2,
    geofence_pb2,
    history_pb2,
    track_pb2,
)

from tests.backends import BACKENDS, backend_settings, stream_owners
from tests.conftest import TRACES, require_shared
from tests.server_fixtures import TenantStubs, embedded_settings
from tracking_grpc.core.precision import snap
from tracking_grpc.server import TrackingServer
from tracking_grpc.traces import Trace, read_trace

SECRET = "event-delivery-test-secret-of-enough-length"
CELL_M = 1_000.0
POSMO = "trackintel_posmo_trajectory.csv"
DEVICE = "walker"
E = event_pb2
ACTIVITY = [
    E.EVENT_TYPE_ONLINE,
    E.EVENT_TYPE_OFFLINE,
    E.EVENT_TYPE_MOTION_CHANGED,
    E.EVENT_TYPE_TRIP_STARTED,
    E.EVENT_TYPE_TRIP_ENDED,
    E.EVENT_TYPE_STOP_STARTED,
    E.EVENT_TYPE_STOP_ENDED,
]
WATCHED = [E.EVENT_TYPE_TRIP_STARTED, E.EVENT_TYPE_STOP_STARTED, E.EVENT_TYPE_OFFLINE]


@pytest.fixture(params=BACKENDS)
async def served(
    request: pytest.FixtureRequest, start_server, tmp_path: Path
) -> AsyncIterator[tuple[TrackingServer, TenantStubs]]:
    rules = tmp_path / "activity.toml"
    rules.write_text("[defaults]\noffline_after_s = 4\n")
    settings = embedded_settings(
        tmp_path,
        auth_mode="jwt",
        jwt_hs256_secret=SECRET,
        max_fix_age_s=0,
        activity_config=str(rules),
    )
    server = await start_server(settings=backend_settings(request, settings))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, TenantStubs(channel, SECRET, CELL_M)


@pytest.fixture(scope="module")
def posmo() -> Trace:
    return read_trace(require_shared(TRACES / POSMO))


async def publish(stubs: TenantStubs, trace: Trace) -> None:
    """The trace as the device's fixes, in one request."""
    fixes = [
        common_pb2.Fix(
            seq=i + 1,
            time_ms=int(t),
            lat=float(lat),
            lon=float(lon),
            **({"accuracy_m": float(a)} if np.isfinite(a) else {}),
        )
        for i, (t, lat, lon, a) in enumerate(
            zip(trace.time_ms, trace.lat, trace.lon, trace.accuracy_m, strict=True)
        )
    ]
    request = track_pb2.PublishBatchRequest(
        devices=[track_pb2.DeviceFixes(device_id=DEVICE, fixes=fixes)]
    )
    answer = await stubs.track.PublishBatch(request, metadata=stubs.admin)
    assert answer.stored == len(fixes)


def settled(events: list[event_pb2.Event]) -> bool:
    """Whether the device has gone OFFLINE after every other event was raised."""
    offline = [e.time_ms for e in events if e.type == E.EVENT_TYPE_OFFLINE]
    others = [e.created_ms for e in events if e.type != E.EVENT_TYPE_OFFLINE]
    return bool(offline and others) and max(offline) >= max(others)


def closed(kinds: list[int]) -> bool:
    """Whether an OFFLINE has come after a trip and a stop started."""
    return (
        bool(kinds) and kinds[-1] == E.EVENT_TYPE_OFFLINE and set(kinds) == set(WATCHED)
    )


async def listed(stubs: TenantStubs, metadata, types=ACTIVITY) -> list[event_pb2.Event]:
    request = geofence_pb2.ListEventsRequest(
        start_ms=0, device_id=DEVICE, types=types, page_size=1000
    )
    return list((await stubs.geofence.ListEvents(request, metadata=metadata)).events)


async def all_stored(stubs: TenantStubs) -> list[event_pb2.Event]:
    """Every activity event of the trace, once the closing OFFLINE is stored."""
    async with asyncio.timeout(60):
        while True:
            events = await listed(stubs, stubs.exact)
            if settled(events):
                return events
            await asyncio.sleep(0.05)


async def test_watch_events_delivers_activity_events_of_the_types_asked(
    served, posmo
) -> None:
    _, stubs = served
    request = geofence_pb2.WatchEventsRequest(types=WATCHED, device_ids=[DEVICE])
    call = stubs.geofence.WatchEvents(request, metadata=stubs.exact)
    await call.initial_metadata()  # subscribed

    await publish(stubs, posmo)
    seen: list[event_pb2.Event] = []
    async with asyncio.timeout(60):
        while not closed([e.type for e in seen]):
            seen.extend((await call.read()).events)
    call.cancel()

    kinds = [e.type for e in seen]
    assert set(kinds) == set(WATCHED)
    assert kinds.index(E.EVENT_TYPE_TRIP_STARTED) < kinds.index(
        E.EVENT_TYPE_STOP_STARTED
    )
    stored = {e.event_id: e for e in await all_stored(stubs)}
    assert all(stored[e.event_id] == e for e in seen)  # the same events, stored


async def test_list_events_returns_activity_events_with_their_detail(
    served, posmo
) -> None:
    _, stubs = served
    await publish(stubs, posmo)

    events = await all_stored(stubs)

    kinds = {e.type for e in events}
    assert set(ACTIVITY) <= kinds
    ended = next(e for e in events if e.type == E.EVENT_TYPE_TRIP_ENDED)
    assert ended.activity.distance_m > 100 and ended.activity.duration_s > 60
    assert ended.activity.max_speed_mps > 0 and not ended.fence_id
    trips = await listed(stubs, stubs.exact, [E.EVENT_TYPE_TRIP_ENDED])
    assert trips == [e for e in events if e.type == E.EVENT_TYPE_TRIP_ENDED]
    # No types: the geofence events, as before activity events were stored.
    assert await listed(stubs, stubs.exact, []) == []


async def test_a_coarse_caller_lists_activity_events_at_cell_centres(
    served, posmo
) -> None:
    _, stubs = served
    await publish(stubs, posmo)
    exact = await all_stored(stubs)

    coarse = await listed(stubs, stubs.coarse)

    assert [e.event_id for e in coarse] == [e.event_id for e in exact]
    lat, lon, _ = snap(
        [e.position.lat for e in exact], [e.position.lon for e in exact], CELL_M
    )
    assert [(e.position.lat, e.position.lon) for e in coarse] == list(
        zip(lat.tolist(), lon.tolist(), strict=True)
    )
    ended = next(e for e in coarse if e.type == E.EVENT_TYPE_TRIP_ENDED)
    assert ended.activity.max_speed_mps == 0 and ended.activity.avg_speed_mps == 0
    assert ended.activity.distance_m % CELL_M == 0


async def test_erase_device_removes_its_activity_events(served, posmo) -> None:
    server, stubs = served
    await publish(stubs, posmo)
    events = await all_stored(stubs)
    settings = server.app.settings
    owner = (stubs.tenant, DEVICE)
    if settings.redis_url:  # every stored event is on the stream
        async with asyncio.timeout(30):
            while True:
                if (await stream_owners(settings)).count(owner) == len(events):
                    break
                await asyncio.sleep(0.05)

    erased = await stubs.history.EraseDevice(
        history_pb2.EraseDeviceRequest(device_id=DEVICE), metadata=stubs.admin
    )

    assert erased.events_erased == len(events)
    assert erased.stream_entries_erased == (len(events) if settings.redis_url else 0)
    assert await listed(stubs, stubs.exact) == []
    if settings.redis_url:
        assert owner not in await stream_owners(settings)
