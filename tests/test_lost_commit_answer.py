"""A group commit whose answer was lost: the history store committed the fixes, the
server never heard so, and the retry found every one of them stored.

Such a loss (the PostgreSQL connection breaking right after COMMIT reached the
server) cannot be produced on demand here, so a fault stands in for it: the real
store's ``store`` is wrapped to store for real and then raise
``StorageUnavailable``, which is what the pipeline sees of a lost answer. The fixes
must still reach the processors (a geofence ENTER, and a recording processor),
once, also when one message carries a fix twice; a genuine resend, in a retried
commit or a plain one, must not reach them again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from tracking.v1 import event_pb2, geofence_pb2, geofence_pb2_grpc, track_pb2_grpc

from tests.geofence.support import DEPOT
from tests.geofence.test_geofence_rpc import BACKENDS, backend_settings
from tests.server_fixtures import batch, fix, hello, now_ms
from tracking_grpc.config import Settings
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import StorageUnavailable
from tracking_grpc.events import TrackingEvent

ENTER, EXIT = event_pb2.EVENT_TYPE_ENTER, event_pb2.EVENT_TYPE_EXIT


class LostAnswers:
    """Wraps a real store's ``store``: once armed, its next call stores for real and
    then raises ``StorageUnavailable``, like a commit whose answer never came."""

    def __init__(self, history) -> None:
        self._store = history.store
        self.armed = False
        self.lost = 0

    async def store(self, fixes: FixBatch):
        new = await self._store(fixes)
        if self.armed:
            self.armed = False
            self.lost += 1
            raise StorageUnavailable("connection lost after COMMIT (test)")
        return new


class Recorder:
    """A processor that notes the (device, seq) of every fix it is given."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    async def process(self, stored: FixBatch) -> list[TrackingEvent]:
        self.seen += zip(stored.device.tolist(), stored.seq.tolist(), strict=True)
        return []


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    return backend_settings(request, tmp_path)


async def send(call, fixes, events: list[event_pb2.Event]) -> int:
    """Send one batch; the ack's acked_seq. Fence events read meanwhile are kept."""
    await call.write(batch(fixes))
    while True:
        response = await asyncio.wait_for(call.read(), 10)
        kind = response.WhichOneof("message")
        if kind == "ack":
            return response.ack.acked_seq
        if kind == "event" and response.event.fence_id:
            events.append(response.event)


async def fence_events_until(call, events: list[event_pb2.Event], seq: int) -> None:
    """Read the stream until the fence event of fix ``seq`` has come."""
    while not any(e.fix_seq == seq for e in events):
        response = await asyncio.wait_for(call.read(), 10)
        if response.WhichOneof("message") == "event" and response.event.fence_id:
            events.append(response.event)


async def test_fixes_of_a_commit_whose_answer_was_lost_are_processed_once(
    start_server, settings
) -> None:
    server = await start_server(settings=settings)
    faults = LostAnswers(server.app.history)
    server.app.history.store = faults.store  # the pipeline holds this very store
    recorder = Recorder()
    server.app.pipeline.add_processor(recorder)
    t = now_ms() - 60_000
    inside = fix(1, 52.52, 13.405, t, accuracy_m=5)
    outside = fix(2, 52.52, 13.4123, t + 1000, accuracy_m=5)
    again = fix(3, 52.52, 13.4051, t + 2000, accuracy_m=5)
    events: list[event_pb2.Event] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await geofence_pb2_grpc.GeofenceStub(channel).CreateFence(
            geofence_pb2.CreateFenceRequest(
                fence=geofence_pb2.Fence(fence_id="depot", shape=DEPOT)
            )
        )
        call = track_pb2_grpc.TrackSessionStub(channel).Track()
        await call.write(hello("van-lost", want_events=True))
        await call.read()
        faults.armed = True  # the fix twice in one message: stored once
        assert await send(call, [inside, inside], events) == 1
        faults.armed = True  # a resend with a new fix, retried too
        assert await send(call, [inside, outside], events) == 2
        assert await send(call, [inside, outside], events) == 2  # a plain resend
        assert await send(call, [again], events) == 3
        await fence_events_until(call, events, 3)
        await call.done_writing()
    assert faults.lost == 2
    assert [(e.type, e.fix_seq) for e in events] == [(ENTER, 1), (EXIT, 2), (ENTER, 3)]
    async with asyncio.timeout(10):  # the recorder runs after the geofences
        while ("van-lost", 3) not in recorder.seen:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert recorder.seen == [("van-lost", 1), ("van-lost", 2), ("van-lost", 3)]


async def test_a_retry_that_cannot_tell_what_it_stored_still_acks(
    start_server, caplog
) -> None:
    """The store goes away again before the retry can ask what the lost try stored:
    the fixes are acked and move the live position, without events, and the
    commits after it go on."""
    server = await start_server()
    faults = LostAnswers(server.app.history)
    server.app.history.store = faults.store

    async def away(fixes: FixBatch):
        raise StorageUnavailable("store away again (test)")

    server.app.history.stored_as_received = away
    t = now_ms() - 60_000
    events: list[event_pb2.Event] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = track_pb2_grpc.TrackSessionStub(channel).Track()
        await call.write(hello("van-unsure"))
        await call.read()
        faults.armed = True
        assert await send(call, [fix(1, 52.52, 13.405, t)], events) == 1
        await live_seq_reaches(server, "van-unsure", 1)
        assert await send(call, [fix(2, 52.52, 13.406, t + 1000)], events) == 2
        await live_seq_reaches(server, "van-unsure", 2)
        await call.done_writing()
    assert "cannot tell what failed tries stored" in caplog.text


async def live_seq_reaches(server, device: str, seq: int) -> None:
    """Wait for the device's live position to be fix ``seq`` (it moves after the
    ack)."""
    tenant = server.app.settings.default_tenant
    async with asyncio.timeout(5):
        while True:
            live = await server.app.live.get(tenant, [device])
            if live.seq.tolist() == [seq]:
                return
            await asyncio.sleep(0.01)
