"""EraseDevice through a real server, on the embedded and the production backends:
one device of one tenant goes from every store and from the process, the same
device id of another tenant stays."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from tracking.v1 import (
    common_pb2,
    event_pb2,
    geofence_pb2,
    geofence_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
    track_pb2,
    track_pb2_grpc,
)

from tests.backends import BACKENDS, backend_settings, on_the_stream, stream_owners
from tests.server_fixtures import (
    Metadata,
    bearer,
    embedded_settings,
    fix,
    now_ms,
    track_session,
    violation,
)
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.server import TrackingServer

SECRET = "erase-test-secret-of-enough-length-for-hs256"
DEPOT = common_pb2.LatLng(lat=60.17, lon=24.94)


def as_role(tenant: str, role: str = "admin") -> Metadata:
    return bearer(SECRET, tenant, role)


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.track = track_pb2_grpc.TrackSessionStub(channel)
        self.history = history_pb2_grpc.HistoryStub(channel)
        self.geofence = geofence_pb2_grpc.GeofenceStub(channel)


@pytest.fixture(params=BACKENDS)
async def served(
    request: pytest.FixtureRequest, start_server, tmp_path: Path
) -> AsyncIterator[tuple[TrackingServer, Stubs]]:
    settings = embedded_settings(tmp_path, auth_mode="jwt", jwt_hs256_secret=SECRET)
    server = await start_server(settings=backend_settings(request, settings))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, Stubs(channel)


async def van_inside_depot(stubs: Stubs, tenant: str) -> list[common_pb2.Fix]:
    """A depot fence, and the van's five fixes inside it, stored and processed
    (its ENTER and ONLINE events stored, its activity taken in)."""
    fence = geofence_pb2.Fence(
        fence_id="depot",
        shape=geofence_pb2.FenceShape(
            circle=common_pb2.Circle(center=DEPOT, radius_m=300)
        ),
    )
    await stubs.geofence.CreateFence(
        geofence_pb2.CreateFenceRequest(fence=fence), metadata=as_role(tenant)
    )
    fixes = [fix(seq, 60.17, 24.94, accuracy_m=5) for seq in range(1, 6)]
    await track_session(stubs.track, "van", [fixes], metadata=as_role(tenant))
    async with asyncio.timeout(30):
        while True:  # its ENTER and ONLINE events stored
            if len(await van_events(stubs, tenant)) == 2:
                break
            await asyncio.sleep(0.01)
        while True:
            try:
                await stubs.history.GetActivity(
                    history_pb2.GetActivityRequest(device_id="van"),
                    metadata=as_role(tenant),
                )
                break
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                await asyncio.sleep(0.01)
    return fixes


async def van_events(stubs: Stubs, tenant: str) -> list:
    """The van's geofence and activity events."""
    types = [event_pb2.EVENT_TYPE_ENTER, event_pb2.EVENT_TYPE_ONLINE]
    request = geofence_pb2.ListEventsRequest(start_ms=0, device_id="van", types=types)
    found = await stubs.geofence.ListEvents(request, metadata=as_role(tenant))
    return list(found.events)


async def van_positions(stubs: Stubs, tenant: str) -> tuple[int, int]:
    """How many live positions GetLastPositions and Nearby give of the van."""
    last = await stubs.track.GetLastPositions(
        track_pb2.GetLastPositionsRequest(device_ids=["van"]), metadata=as_role(tenant)
    )
    near = await stubs.track.Nearby(
        track_pb2.NearbyRequest(center=DEPOT, radius_m=1_000), metadata=as_role(tenant)
    )
    return len(last.positions), len(near.devices)


async def van_track(stubs: Stubs, tenant: str) -> int:
    request = history_pb2.GetTrackRequest(
        device_id="van", start_ms=now_ms() - 86_400_000, end_ms=now_ms() + 60_000
    )
    call = stubs.history.GetTrack(request, metadata=as_role(tenant))
    return sum([len(part.positions) async for part in call])


async def test_erase_removes_the_device_of_one_tenant_everywhere(served) -> None:
    server, stubs = served
    erased_tenant, kept_tenant = (f"erase-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for tenant in (erased_tenant, kept_tenant):
        await van_inside_depot(stubs, tenant)
    events = await van_events(stubs, erased_tenant)
    settings = server.app.settings
    if settings.redis_url:
        await on_the_stream(settings, {(erased_tenant, "van"), (kept_tenant, "van")})
        async with asyncio.timeout(30):  # every stored event is on the stream
            while True:
                owners = await stream_owners(settings)
                if owners.count((erased_tenant, "van")) == len(events):
                    break
                await asyncio.sleep(0.05)

    erased = await stubs.history.EraseDevice(
        history_pb2.EraseDeviceRequest(device_id="van"),
        metadata=as_role(erased_tenant),
    )

    assert erased == history_pb2.EraseDeviceResponse(
        device_id="van",
        fixes_erased=5,
        events_erased=len(events),
        live_position_erased=True,
        memberships_erased=1,
        activity_erased=True,
        sequence_reset=True,
        stream_entries_erased=len(events) if settings.redis_url else 0,
    )
    assert await van_positions(stubs, erased_tenant) == (0, 0)
    assert await van_track(stubs, erased_tenant) == 0
    assert await van_events(stubs, erased_tenant) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.history.GetActivity(
            history_pb2.GetActivityRequest(device_id="van"),
            metadata=as_role(erased_tenant),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await van_positions(stubs, kept_tenant) == (1, 1)
    assert await van_track(stubs, kept_tenant) == 5
    assert len(await van_events(stubs, kept_tenant)) == len(events)
    if settings.redis_url:  # the event stream too
        owners = await stream_owners(settings)
        assert (erased_tenant, "van") not in owners
        assert (kept_tenant, "van") in owners


async def test_an_erased_device_starts_again_at_seq_1(served) -> None:
    server, stubs = served
    tenant = f"erase-{uuid.uuid4().hex[:8]}"
    await track_session(
        stubs.track, "van", [[fix(7, 60.17, 24.94)]], metadata=as_role(tenant)
    )
    await stubs.history.EraseDevice(
        history_pb2.EraseDeviceRequest(device_id="van"), metadata=as_role(tenant)
    )

    started, acks = await track_session(
        stubs.track, "van", [[fix(1, 60.17, 24.94)]], metadata=as_role(tenant)
    )

    assert started.last_stored_seq == 0
    assert (acks[0].stored, acks[0].duplicates) == (1, 0)
    assert await server.app.history.count(tenant, "van") == 1


async def test_erasing_an_unknown_device_erases_nothing(served) -> None:
    _, stubs = served
    erased = await stubs.history.EraseDevice(
        history_pb2.EraseDeviceRequest(device_id="never-seen"),
        metadata=as_role(f"erase-{uuid.uuid4().hex[:8]}"),
    )
    assert erased == history_pb2.EraseDeviceResponse(device_id="never-seen")


async def test_history_stored_under_an_id_with_edge_spaces_stays_erasable(
    served,
) -> None:
    """Ids with a space at either end were stored before the device id rule refused
    them; EraseDevice still takes such an id, and erases only that device."""
    server, stubs = served
    tenant = f"erase-{uuid.uuid4().hex[:8]}"
    t = now_ms()
    old = FixBatch.from_columns(
        tenant, [" van", "van"], [1, 1], [t, t], [60.17, 60.17], [24.94, 24.94]
    )
    await server.app.history.store(old)
    erased = await stubs.history.EraseDevice(
        history_pb2.EraseDeviceRequest(device_id=" van"), metadata=as_role(tenant)
    )
    assert (erased.device_id, erased.fixes_erased) == (" van", 1)
    assert await server.app.history.count(tenant, " van") == 0
    assert await server.app.history.count(tenant, "van") == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # the rule's other checks
        await stubs.history.EraseDevice(
            history_pb2.EraseDeviceRequest(device_id=" van\t"),
            metadata=as_role(tenant),
        )
    assert violation(caught.value) == (
        "device_id",
        "has a character that is not printable",
    )


@pytest.mark.parametrize(
    ("role", "device_id", "code"),
    [
        pytest.param("viewer", "van", grpc.StatusCode.PERMISSION_DENIED, id="viewer"),
        pytest.param("device", "van", grpc.StatusCode.PERMISSION_DENIED, id="device"),
        pytest.param("admin", " ", grpc.StatusCode.INVALID_ARGUMENT, id="blank-id"),
    ],
)
async def test_erase_refuses(served, role: str, device_id: str, code) -> None:
    server, stubs = served
    tenant = f"erase-{uuid.uuid4().hex[:8]}"
    await track_session(
        stubs.track, "van", [[fix(1, 60.17, 24.94)]], metadata=as_role(tenant)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.history.EraseDevice(
            history_pb2.EraseDeviceRequest(device_id=device_id),
            metadata=as_role(tenant, role),
        )
    assert caught.value.code() == code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert violation(caught.value) == (
            "device_id",
            "must not be empty or only spaces",
        )
    assert await server.app.history.count(tenant, "van") == 1
