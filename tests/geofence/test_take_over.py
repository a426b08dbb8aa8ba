"""Geofence memberships of devices moving between server processes (one PostgreSQL
and one Redis): the process that gets a device's fixes first reloads its
memberships from the stored events, in one query for all such devices of a batch,
and the process that held it lets it go (no stale DWELL, no missed ENTER). A single
process without Redis keeps its memberships in memory and reads the store once."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import grpc
import pytest
from tracking.v1 import (
    common_pb2,
    event_pb2,
    geofence_pb2,
    geofence_pb2_grpc,
    track_pb2_grpc,
)

from tests.geofence.support import DEPOT, summary
from tests.geofence.test_rules import FAR, INSIDE, SQUARE, T0, square
from tests.server_fixtures import (
    batch,
    embedded_settings,
    fix,
    hello,
    now_ms,
    track_session,
    until,
)
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import StorageUnavailable
from tracking_grpc.events import EventType, TrackingEvent, event_id
from tracking_grpc.geofence import processor as processor_module
from tracking_grpc.geofence.model import FenceSpec
from tracking_grpc.geofence.processor import Announce, GeofenceProcessor
from tracking_grpc.server import TrackingServer
from tracking_grpc.servicers.geofence import FENCE_HOLDERS
from tracking_grpc.storage.fences import EventQuery, Memberships
from tracking_grpc.storage.postgres import PostgresHistoryStore
from tracking_grpc.storage.postgres_fences import (
    PostgresEventRepository,
    PostgresFenceRepository,
    PostgresGeofenceDatabase,
)
from tracking_grpc.storage.redis_client import Connection
from tracking_grpc.storage.redis_notices import RedisDeviceNotices

pytestmark = pytest.mark.postgres

DWELL_MS = 120_000
_LAST_RECEIPT = [0]


def receipt() -> int:
    """When an acked batch came: now, and later than the batch before."""
    _LAST_RECEIPT[0] = max(now_ms(), _LAST_RECEIPT[0] + 1)
    return _LAST_RECEIPT[0]


HANG_S = 30  # a hang guard: what is waited for comes far sooner
MANY = 2_500  # devices of one take-over: three notice entries
ENTER, EXIT = event_pb2.EVENT_TYPE_ENTER, event_pb2.EVENT_TYPE_EXIT


class CountedEvents(PostgresEventRepository):
    """The real event repository, counting the membership queries of one tenant
    (by devices asked for; None: the whole tenant's)."""

    def __init__(self, db: PostgresGeofenceDatabase, tenant: str) -> None:
        super().__init__(db)
        self.tenant = tenant
        self.asked: list[list[str] | None] = []
        # Awaited before a query of some devices (while the query "runs").
        self.meanwhile: Callable[[], Awaitable[None]] | None = None
        self.out = False  # the store answers no query of some devices

    async def memberships(
        self, tenant: str, devices: Sequence[str] | None = None
    ) -> Memberships:
        if tenant == self.tenant:
            self.asked.append(None if devices is None else list(devices))
            if devices is not None and self.meanwhile is not None:
                await self.meanwhile()
            if devices is not None and self.out:
                raise StorageUnavailable("the event store is out")
        return await super().memberships(tenant, devices)


@dataclass
class Process:
    """A server process's geofence processor on the shared database."""

    processor: GeofenceProcessor
    events: CountedEvents
    notices: RedisDeviceNotices | None

    async def feed(self, batch: FixBatch) -> list[TrackingEvent]:
        """Evaluate a stored batch and store its events (as the event store
        listener does before another process could read them)."""
        events = await self.processor.process(batch)
        await self.events.add(events)
        return events

    async def ack(self, batch: FixBatch, received_ms: int = 0) -> FixBatch:
        """Store a batch's fixes, as a commit does before its ack (the
        processors have them later: ``feed``); the batch as stored, stamped
        with its receipt (each batch later than the one before, or
        ``received_ms``)."""
        assert self.processor.history is not None
        received = batch.with_received(received_ms or receipt())
        await self.processor.history.store(received)
        return received


async def open_process(
    url: str,
    tenant: str,
    redis_url: str | None = None,
    prefix: str = "",
    history: PostgresHistoryStore | None = None,
) -> tuple[Process, PostgresGeofenceDatabase]:
    db = await PostgresGeofenceDatabase.open(url)
    events = CountedEvents(db, tenant)
    processor = GeofenceProcessor(PostgresFenceRepository(db), events, history=history)
    notices = None
    if redis_url is not None:  # wired as the Geofence service does
        notices = RedisDeviceNotices(
            Connection(redis_url),
            prefix,
            processor.released,
            stream=FENCE_HOLDERS,
            subject="fence holder",
            own=processor.announced,
        )
        processor.hear(notices.announce_many, notices.start)
        await until(lambda: notices.last_id is not None)
    return Process(processor, events, notices), db


def heard(process: Process) -> int:
    """Devices named in the take-over notices of other processes it acted on."""
    assert process.notices is not None
    return process.notices.heard


def fixes(tenant: str, device: str, *rows: tuple) -> FixBatch:
    """(seq, seconds after T0, (lat, lon)) of one device."""
    return FixBatch.from_columns(
        tenant,
        [device] * len(rows),
        [r[0] for r in rows],
        [T0 + int(r[1] * 1000) for r in rows],
        [r[2][0] for r in rows],
        [r[2][1] for r in rows],
        accuracy_m=[5.0] * len(rows),
    )


def many(tenant: str, seq: int, at_s: float, where: tuple[float, float]) -> FixBatch:
    devices = [f"van-{n}" for n in range(MANY)]
    return FixBatch.from_columns(
        tenant,
        devices,
        [seq] * MANY,
        [T0 + int(at_s * 1000)] * MANY,
        [where[0]] * MANY,
        [where[1]] * MANY,
        accuracy_m=[5.0] * MANY,
    )


@pytest.fixture
async def two_processes(
    geo_pg_url: str, redis_url: str, redis_prefix: str, tenant: str
) -> AsyncIterator[tuple[Process, Process]]:
    """Two processes on one database and one Redis, the tenant's square fence
    (DWELL after two minutes) created."""
    first, first_db = await open_process(geo_pg_url, tenant, redis_url, redis_prefix)
    second, second_db = await open_process(geo_pg_url, tenant, redis_url, redis_prefix)
    fence = square(dwell_ms=DWELL_MS)[0]
    await first.processor.fences.create(tenant, fence, T0)
    try:
        yield first, second
    finally:
        for process, db in ((first, first_db), (second, second_db)):
            await process.processor.drain()
            assert process.notices is not None
            await process.notices.close()
            await db.close()


@pytest.fixture
async def history(pg_url: str) -> AsyncIterator[PostgresHistoryStore]:
    store = await PostgresHistoryStore.open(pg_url)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def acking_processes(
    pg_url: str,
    redis_url: str,
    redis_prefix: str,
    tenant: str,
    history: PostgresHistoryStore,
) -> AsyncIterator[tuple[Process, Process]]:
    """``two_processes`` with their fixes' history store (all the migrations'
    database): a take-over reads the fixes stored before its batch."""
    made = [
        await open_process(pg_url, tenant, redis_url, redis_prefix, history)
        for _ in range(2)
    ]
    (first, _), (second, _) = made
    await first.processor.fences.create(tenant, square(dwell_ms=DWELL_MS)[0], T0)
    try:
        yield first, second
    finally:
        for process, db in made:
            await process.processor.drain()
            assert process.notices is not None
            await process.notices.close()
            await db.close()


async def stored_summary(process: Process, tenant: str) -> list[tuple[str, int]]:
    query = EventQuery(tenant, 0, 2**62, device="van", limit=1_000)
    return summary(await process.events.list(query))


@pytest.mark.redis
async def test_a_take_over_judges_the_fixes_the_holder_has_not_judged_yet(
    acking_processes, tenant
) -> None:
    """The blind window: the van's fix into the square is stored (acked) on a,
    whose processors have not had it when the van's next fix, out of the
    square, comes to b. b judges it first: one ENTER and one EXIT, whichever
    process stores the ENTER first (the same event, the same id)."""
    a, b = acking_processes
    assert await b.feed(fixes(tenant, "scout", (1, 0, FAR))) == []  # b loaded
    entering = await a.ack(fixes(tenant, "van", (1, 0, INSIDE)))
    leaving = await b.ack(fixes(tenant, "van", (2, 60, FAR)))

    raised = await b.processor.process(leaving)  # not stored yet

    assert summary(raised) == [("ENTER", 1), ("EXIT", 2)]
    assert b.processor.holds(tenant, "van")
    # a's processors have the fix at last, and store its ENTER first.
    entered = await a.feed(entering)
    assert [e.event_id for e in entered] == [raised[0].event_id]
    assert await b.events.add(raised) == 1
    assert await stored_summary(a, tenant) == [("ENTER", 1), ("EXIT", 2)]


@pytest.mark.redis
async def test_a_take_over_of_a_device_whose_fixes_were_judged_raises_nothing_again(
    acking_processes, tenant
) -> None:
    """Fixes the previous holder judged, a late one among them (it came after a
    newer fix, and changed nothing there), raise no event where the device
    moves to."""
    a, b = acking_processes
    assert await b.feed(fixes(tenant, "scout", (1, 0, FAR))) == []
    for sent, raised in (
        (fixes(tenant, "van", (1, 0, INSIDE)), [("ENTER", 1)]),
        (fixes(tenant, "van", (2, 30, FAR)), [("EXIT", 2)]),
        (fixes(tenant, "van", (4, 90, FAR)), []),
        (fixes(tenant, "van", (3, 60, INSIDE)), []),  # late
    ):
        assert summary(await a.feed(await a.ack(sent))) == raised
    await until(lambda: heard(b) == 1)
    onward = await b.ack(fixes(tenant, "van", (5, 120, FAR)))

    assert await b.feed(onward) == []
    assert await stored_summary(b, tenant) == [("ENTER", 1), ("EXIT", 2)]
    assert b.processor.holds(tenant, "van")


@pytest.mark.redis
@pytest.mark.parametrize("received_s_ago", [1, 600])
async def test_a_take_over_crosses_from_the_last_fix_judged_before_it(
    acking_processes, tenant, received_s_ago
) -> None:
    """The segment to the van's first fix on b starts at its last fix on a,
    judged again (received lately) or only placing the van (long ago)."""
    a, b = acking_processes
    gate = FenceSpec("gate", SQUARE, events=frozenset({EventType.CROSS}))
    await a.processor.fences.create(tenant, gate, T0)
    assert await b.feed(fixes(tenant, "scout", (1, 0, FAR))) == []
    west, east = (52.52, 13.396), (52.52, 13.404)  # either side of both fences
    received_ms = now_ms() - received_s_ago * 1000
    before = await a.ack(fixes(tenant, "van", (1, 0, west)), received_ms)
    assert await a.feed(before) == []
    await until(lambda: heard(b) == 1)
    after = await b.ack(fixes(tenant, "van", (2, 20, east)))

    crossed = await b.feed(after)

    assert [(e.type.name, e.fence_id, e.fix_seq) for e in crossed] == [
        ("CROSS", "gate", 2)
    ]


@pytest.mark.redis
async def test_a_take_over_by_a_batch_older_than_the_last_event_places_nothing_stale(
    acking_processes, tenant
) -> None:
    """The van went from west of the square (0 s) into it (30 s: ENTER) on a; b
    takes it over with a batch from 20 s (late) to 40 s (east of it). The stored
    fix before the batch (west, 0 s) is older than the ENTER, so it does not
    place the van: the segment to 40 s does not start west of the gate, which
    the van never crossed, and only the EXIT is raised."""
    a, b = acking_processes
    gate = FenceSpec("gate", SQUARE, events=frozenset({EventType.CROSS}))
    await a.processor.fences.create(tenant, gate, T0)
    assert await b.feed(fixes(tenant, "scout", (1, 0, FAR))) == []
    west, east = (52.52, 13.396), (52.52, 13.404)  # either side of both fences
    assert await a.feed(await a.ack(fixes(tenant, "van", (1, 0, west)))) == []
    entered = await a.feed(await a.ack(fixes(tenant, "van", (2, 30, INSIDE))))
    assert ("ENTER", 2) in summary(entered)
    await until(lambda: heard(b) == 1)
    onward = await b.ack(fixes(tenant, "van", (3, 20, west), (4, 40, east)))

    raised = await b.feed(onward)

    assert [(e.type.name, e.fence_id, e.fix_seq) for e in raised] == [("EXIT", "sq", 4)]
    assert b.processor.holds(tenant, "van")


@pytest.mark.redis
async def test_the_process_a_device_moves_to_raises_its_exit(
    two_processes, tenant
) -> None:
    a, b = two_processes
    # b has loaded the tenant's memberships before the van enters on a.
    assert await b.feed(fixes(tenant, "scout", (1, 0, FAR))) == []
    assert summary(await a.feed(fixes(tenant, "van", (1, 0, INSIDE)))) == [("ENTER", 1)]
    await until(lambda: heard(b) == 1)  # a's take-over, before the van moves

    left = await b.feed(fixes(tenant, "van", (2, 60, FAR)))

    assert summary(left) == [("EXIT", 2)]
    assert b.events.asked[-1] == ["van"]  # reloaded before it was evaluated
    await until(lambda: not a.processor.holds(tenant, "van"))
    assert b.processor.holds(tenant, "van")


@pytest.mark.redis
@pytest.mark.parametrize("inline_members", [processor_module.INLINE_MEMBERS, 0])
async def test_the_process_a_device_left_raises_no_stale_dwell(
    two_processes, tenant, inline_members, monkeypatch
) -> None:
    """(Also with every take-over and let-go rebuilt in a worker thread.)"""
    monkeypatch.setattr(processor_module, "INLINE_MEMBERS", inline_members)
    a, b = two_processes
    assert summary(await a.feed(fixes(tenant, "van", (1, 0, INSIDE)))) == [("ENTER", 1)]
    await until(lambda: heard(b) == 1)  # a's take-over, before the van moves
    assert summary(await b.feed(fixes(tenant, "van", (2, 60, FAR)))) == [("EXIT", 2)]
    await until(lambda: heard(a) == 1)  # b's take-over

    # The stay ended on b before its DWELL was due: a's timer raises nothing.
    assert of_tenant(await a.processor.tick(T0 + 3_600_000), tenant) == []
    # Back on a, inside past the old stay's DWELL time: a new stay begins.
    back = await a.feed(fixes(tenant, "van", (3, 300, INSIDE)))
    assert summary(back) == [("ENTER", 3)]
    await until(lambda: heard(b) == 2)  # a's take-overs: the first, and now
    assert summary(of_tenant(await a.processor.tick(T0 + 3_600_000), tenant)) == [
        ("DWELL", 3)
    ]
    assert of_tenant(await b.processor.tick(T0 + 3_600_000), tenant) == []


@pytest.mark.redis
async def test_a_take_over_of_many_devices_is_one_query(two_processes, tenant) -> None:
    a, b = two_processes
    assert await b.feed(fixes(tenant, "scout", (1, 0, FAR))) == []
    entered = await a.feed(many(tenant, 1, 0, INSIDE))
    assert len(entered) == MANY
    await until(lambda: heard(b) == MANY)  # a's take-over, before the vans move
    queries = len(b.events.asked)

    left = await b.feed(many(tenant, 2, 60, FAR))

    assert {e.type.name for e in left} == {"EXIT"} and len(left) == MANY
    assert len(b.events.asked) == queries + 1
    assert sorted(b.events.asked[-1] or []) == sorted(e.device for e in left)
    await until(lambda: heard(a) == 1 + MANY)  # the scout, then the vans
    assert not any(a.processor.holds(tenant, e.device) for e in left)
    assert of_tenant(await a.processor.tick(T0 + 3_600_000), tenant) == []
    # Held now: the next batch of the same devices reads nothing.
    assert await b.feed(many(tenant, 3, 120, FAR)) == []
    assert len(b.events.asked) == queries + 1


@pytest.mark.redis
async def test_the_timer_reads_the_stay_of_a_device_held_elsewhere_again(
    two_processes, tenant
) -> None:
    """A process that loaded the tenant (its start) while the van was inside a
    fence, the van's fixes going to another process all along: before its timer
    raises the van's DWELL it reads the van's stored events, which say it left."""
    a, b = two_processes
    assert summary(await b.feed(fixes(tenant, "van", (1, 0, INSIDE)))) == [("ENTER", 1)]
    await until(lambda: heard(a) == 1)  # b's take-over, before a loads the tenant
    assert await a.feed(fixes(tenant, "scout", (1, 0, FAR))) == []
    assert summary(await b.feed(fixes(tenant, "van", (2, 60, FAR)))) == [("EXIT", 2)]
    asked = len(a.events.asked)
    later = now_ms() + 3_600_000  # the silence of a loaded stay counts from its load

    # (The first tick also loads every other tenant of the shared database.)
    assert of_tenant(await a.processor.tick(later), tenant) == []

    assert a.events.asked[asked:] == [["van"]]
    assert of_tenant(await a.processor.tick(later), tenant) == []
    assert a.events.asked[asked:] == [["van"]]  # not inside: nothing more to read


@pytest.mark.redis
async def test_a_notice_read_while_a_take_over_reads_the_store_lets_nothing_go(
    two_processes, tenant
) -> None:
    """b takes the van over; a's batch of the van asks the store for its
    memberships, and b's notice comes while the query runs: it is older than a's
    own take-over, so a keeps the van (and b lets it go): one holder, one DWELL."""
    a, b = two_processes
    assert await a.feed(fixes(tenant, "scout", (1, 0, FAR))) == []  # a's load
    before = heard(a)
    query_runs = asyncio.Event()
    tell = b.processor.announce
    assert tell is not None

    async def once_a_asks(tenant: str, devices: Sequence[str]) -> None:
        await query_runs.wait()
        await tell(tenant, devices)

    async def notice_comes() -> None:
        query_runs.set()
        await until(lambda: heard(a) > before)

    b.processor.announce = once_a_asks
    a.events.meanwhile = notice_comes
    assert summary(await b.feed(fixes(tenant, "van", (1, 0, INSIDE)))) == [("ENTER", 1)]
    assert await a.feed(fixes(tenant, "van", (2, 10, INSIDE))) == []
    a.events.meanwhile = None
    await until(lambda: not b.processor.holds(tenant, "van"))  # a's notice
    later = now_ms() + 3_600_000

    dwells = of_tenant(await a.processor.tick(later), tenant)

    assert a.processor.holds(tenant, "van")
    assert summary(dwells) == [("DWELL", 2)]
    assert of_tenant(await b.processor.tick(later), tenant) == []


@pytest.mark.redis
async def test_a_late_fix_of_a_device_another_process_took_over_raises_nothing(
    two_processes, tenant
) -> None:
    """a's batch still in flight when the van moved to b: its fix is older than
    the EXIT b stored, so a neither re-enters the van nor takes it over."""
    a, b = two_processes
    assert summary(await a.feed(fixes(tenant, "van", (1, 0, INSIDE)))) == [("ENTER", 1)]
    await until(lambda: heard(b) == 1)
    assert summary(await b.feed(fixes(tenant, "van", (3, 60, FAR)))) == [("EXIT", 3)]
    await until(lambda: heard(a) == 1)  # a let the van go

    late = await a.feed(fixes(tenant, "van", (2, 55, INSIDE)))

    assert late == []
    assert a.events.asked[-1] == ["van"]
    assert not a.processor.holds(tenant, "van")
    # A take-over announced after it: a notice of the van would come before.
    assert summary(await a.feed(fixes(tenant, "car", (1, 0, FAR)))) == []
    await until(lambda: heard(b) >= 2)
    assert b.processor.holds(tenant, "van")


@pytest.mark.redis
async def test_the_timer_raises_the_dwells_of_held_devices_while_the_store_is_out(
    two_processes, tenant
) -> None:
    a, b = two_processes
    assert summary(await b.feed(fixes(tenant, "van", (1, 0, INSIDE)))) == [("ENTER", 1)]
    await until(lambda: heard(a) == 1)  # b's take-over, before a loads the tenant
    assert summary(await a.feed(fixes(tenant, "car", (1, 0, INSIDE)))) == [("ENTER", 1)]
    a.events.out = True  # the van (not held by a) cannot be read again

    dwells = of_tenant(await a.processor.tick(now_ms() + 3_600_000), tenant)

    assert summary(dwells) == [("DWELL", 1)] and dwells[0].device == "car"
    # A batch whose take-over fails keeps no reference to itself.
    with pytest.raises(StorageUnavailable):
        await a.feed(fixes(tenant, "bus", (1, 0, FAR)))
    assert a.processor._detectors[tenant]._prepared is None


async def alone_announcing(
    geo_pg_url: str, tenant: str, announce: Announce
) -> tuple[Process, PostgresGeofenceDatabase]:
    """One process told it has others (announcing with ``announce``) whose own
    notices never come back (it hears nothing)."""

    async def deaf() -> None:
        return None

    alone, db = await open_process(geo_pg_url, tenant)
    alone.processor.hear(announce, deaf)
    await alone.processor.fences.create(tenant, square(dwell_ms=DWELL_MS)[0], T0)
    return alone, db


async def test_take_overs_whose_notices_do_not_come_back_are_forgotten(
    geo_pg_url: str, tenant: str, monkeypatch
) -> None:
    sent: list[list[str]] = []

    async def announce(tenant: str, devices: Sequence[str]) -> None:
        sent.append(list(devices))
        if "broken" in devices:
            raise RuntimeError("a bug in announcing")

    alone, db = await alone_announcing(geo_pg_url, tenant, announce)
    processor = alone.processor
    try:
        await alone.feed(fixes(tenant, "van", (1, 0, INSIDE)))
        await until(lambda: len(sent) == 1)
        # Erased and back before its first notice came back: taken over again.
        await processor.forget_device(tenant, "van")
        await alone.feed(fixes(tenant, "van", (2, 10, INSIDE)))
        await until(lambda: len(sent) == 2)
        await processor.announced(tenant, "van")  # the first notice

        # A notice of another process read now is older than the second.
        assert await processor.released(tenant, "van") == {}
        assert processor.holds(tenant, "van")

        await alone.feed(fixes(tenant, "broken", (1, 0, FAR)))
        await until(lambda: ("broken",) not in {k[1:] for k in processor._announcing})
        monkeypatch.setattr(processor_module, "NOTICE_BACK_S", 0.0)
        await processor.tick(now_ms())
        assert processor._announcing == {}
    finally:
        await processor.drain()
        await db.close()


async def test_take_overs_made_while_one_is_announced_are_announced_together(
    geo_pg_url: str, tenant: str
) -> None:
    calls: list[list[str]] = []
    first_sent = asyncio.Event()

    async def announce(tenant: str, devices: Sequence[str]) -> None:
        calls.append(list(devices))
        await first_sent.wait()

    alone, db = await alone_announcing(geo_pg_url, tenant, announce)
    try:
        await alone.feed(fixes(tenant, "van-1", (1, 0, FAR)))
        await until(lambda: len(calls) == 1)
        for n in (2, 3, 4):
            await alone.feed(fixes(tenant, f"van-{n}", (1, 0, FAR)))
        first_sent.set()

        await until(lambda: len(calls) == 2)

        assert calls == [["van-1"], ["van-2", "van-3", "van-4"]]
    finally:
        await alone.processor.drain()
        await db.close()


@pytest.mark.redis
async def test_an_outage_of_the_notices_is_warned_of_once(
    geo_pg_url: str, redis_url: str, redis_prefix: str, tenant: str, caplog
) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        nowhere = f"redis://127.0.0.1:{free.getsockname()[1]}/0"
    down, up = (
        RedisDeviceNotices(
            Connection(url),
            redis_prefix,
            forget_nothing,
            stream=FENCE_HOLDERS,
            subject="fence holder",
        )
        for url in (nowhere, redis_url)
    )
    tried: list[list[str]] = []
    notices = [down]

    async def announce(tenant: str, devices: Sequence[str]) -> None:
        try:
            await notices[0].announce_many(tenant, devices)
        finally:
            tried.append(list(devices))

    alone, db = await alone_announcing(geo_pg_url, tenant, announce)
    caplog.set_level(logging.DEBUG, logger=processor_module.__name__)
    try:
        for n in (1, 2, 3):
            await alone.feed(fixes(tenant, f"van-{n}", (1, 0, FAR)))
            await until(lambda n=n: len(tried) == n)  # type: ignore[misc]
        notices[0] = up
        await alone.feed(fixes(tenant, "van-4", (1, 0, FAR)))
        await until(lambda: len(tried) == 4)

        told = [
            (r.levelno, r.getMessage())
            for r in caplog.records
            if r.name == processor_module.__name__ and r.levelno >= logging.INFO
            and "announced" in r.getMessage()
        ]  # fmt: skip
        assert [level for level, _ in told] == [logging.WARNING, logging.INFO]
        assert "unavailable" in told[0][1]
    finally:
        await alone.processor.drain()
        await db.close()
        await down.close()
        await up.close()


async def forget_nothing(tenant: str, device: str) -> None:
    return None


def of_tenant(events: list[TrackingEvent], tenant: str) -> list[TrackingEvent]:
    return [e for e in events if e.tenant == tenant]


async def test_a_single_process_keeps_its_memberships_in_memory(
    geo_pg_url: str, tenant: str
) -> None:
    """Without Redis there is no other process: the tenant's memberships are read
    once, and what is stored afterwards (an EXIT here, as a process of an older
    version elsewhere would store it) is not read again."""
    alone, db = await open_process(geo_pg_url, tenant)
    try:
        await alone.processor.fences.create(tenant, square(dwell_ms=DWELL_MS)[0], T0)
        entered = await alone.feed(fixes(tenant, "van", (1, 0, INSIDE)))
        assert summary(entered) == [("ENTER", 1)]
        await alone.events.add([exit_of(entered[0], 10_000)])

        stayed = await alone.feed(fixes(tenant, "van", (2, 300, INSIDE)))

        assert summary(stayed) == [("DWELL", 2)]  # the stay in memory goes on
        assert alone.events.asked == [None]  # the tenant's load, nothing since
        assert alone.processor.holds(tenant, "van")
    finally:
        await db.close()


def exit_of(enter: TrackingEvent, after_ms: int) -> TrackingEvent:
    time_ms = enter.time_ms + after_ms
    kind, fence = EventType.EXIT, enter.fence_id
    return replace(
        enter,
        type=kind,
        time_ms=time_ms,
        event_id=event_id(enter.tenant, enter.device, kind, time_ms, fence),
    )


# Two real servers ---------------------------------------------------------------

DEPOT_LAT, DEPOT_LON = 52.52, 13.405  # support.DEPOT: 100 m around it
AWAY_LAT = 52.53  # about a kilometre north
FENCE_EVENTS = HANG_S


async def fence_events(
    channel: grpc.aio.Channel, device: str, fixes: list[common_pb2.Fix], count: int
) -> list[int]:
    """Send the fixes on a stream of their own; the types of the first ``count``
    fence events it brings."""
    call = track_pb2_grpc.TrackSessionStub(channel).Track()
    await call.write(hello(device, want_events=True))
    await call.read()
    await call.write(batch(fixes))
    kinds: list[int] = []
    async with asyncio.timeout(FENCE_EVENTS):
        while len(kinds) < count:
            response = await call.read()
            if response.WhichOneof("message") == "event" and response.event.fence_id:
                kinds.append(response.event.type)
    call.cancel()
    return kinds


async def stored_kinds(channel: grpc.aio.Channel, device: str) -> list[int]:
    request = geofence_pb2.ListEventsRequest(start_ms=0, device_id=device)
    found = await geofence_pb2_grpc.GeofenceStub(channel).ListEvents(request)
    return [e.type for e in found.events if e.fence_id]


def geofence_of(server: TrackingServer) -> GeofenceProcessor:
    (processor,) = [
        p for p in server.app.pipeline.processors if isinstance(p, GeofenceProcessor)
    ]
    return processor


async def two_servers(
    start_server, pg_url: str, redis_url: str, redis_prefix: str, tmp_path
) -> tuple[str, TrackingServer, TrackingServer]:
    """A new tenant, and two servers sharing one PostgreSQL and Redis."""
    tenant = f"geo-{uuid.uuid4().hex[:8]}"
    settings = replace(
        embedded_settings(tmp_path), database_url=pg_url, redis_url=redis_url,
        redis_key_prefix=redis_prefix, default_tenant=tenant,
    )  # fmt: skip
    first = await start_server(settings=settings)
    second = await start_server(
        settings=replace(settings, data_dir=str(tmp_path / "b"))
    )
    return tenant, first, second


async def create_depot(channel: grpc.aio.Channel, **fields: int) -> None:
    fence = geofence_pb2.Fence(fence_id="depot", shape=DEPOT, **fields)
    await geofence_pb2_grpc.GeofenceStub(channel).CreateFence(
        geofence_pb2.CreateFenceRequest(fence=fence)
    )


async def until_async(check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(HANG_S):
        while not await check():  # noqa: ASYNC110 - polls a server
            await asyncio.sleep(0.02)


@pytest.mark.redis
async def test_a_device_reconnecting_to_another_server_exits_there_and_enters_back(
    start_server, pg_url, redis_url, redis_prefix, tmp_path
) -> None:
    tenant, first, second = await two_servers(
        start_server, pg_url, redis_url, redis_prefix, tmp_path
    )
    t0 = now_ms() - 20 * 60_000
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as to_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as to_b,
    ):
        await create_depot(to_a, dwell_ms=600_000)
        # The second server knows the tenant's memberships before the van enters.
        scout = [fix(1, DEPOT_LAT, DEPOT_LON, t0, accuracy_m=5)]
        assert await fence_events(to_b, "scout", scout, 1) == [ENTER]
        van_in = [fix(1, DEPOT_LAT, DEPOT_LON, t0, accuracy_m=5)]
        assert await fence_events(to_a, "van", van_in, 1) == [ENTER]
        await until_async(lambda: _equal(stored_kinds(to_a, "van"), [ENTER]))

        # The van reconnects to the second server and leaves the depot there.
        away = [fix(2, AWAY_LAT, DEPOT_LON, t0 + 5 * 60_000, accuracy_m=5)]
        assert await fence_events(to_b, "van", away, 1) == [EXIT]
        await until_async(lambda: _equal(stored_kinds(to_a, "van"), [ENTER, EXIT]))
        await until(lambda: not geofence_of(first).holds(tenant, "van"))

        # Back on the first, inside past the DWELL time of the stay that ended.
        back = [fix(3, DEPOT_LAT, DEPOT_LON, t0 + 15 * 60_000, accuracy_m=5)]
        assert await fence_events(to_a, "van", back, 1) == [ENTER]


@pytest.mark.redis
async def test_a_device_reconnecting_before_its_fix_was_judged_gets_each_event_once(
    start_server, pg_url, redis_url, redis_prefix, tmp_path
) -> None:
    """The van's fix into the depot is acked by the first server, whose
    processors have not had it (held up here) when the van's next fix, out of
    it, comes to the second: that one judges the first fix too. One ENTER and
    one EXIT are stored, in order, after the first server's processors have
    had the fix as well."""
    tenant, first, second = await two_servers(
        start_server, pg_url, redis_url, redis_prefix, tmp_path
    )
    t0 = now_ms() - 20 * 60_000
    inside = (DEPOT_LAT, DEPOT_LON)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as to_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as to_b,
    ):
        await create_depot(to_a)
        # Both servers know the tenant's memberships before the van comes.
        for channel, device in ((to_a, "scout-a"), (to_b, "scout-b")):
            scout = [fix(1, *inside, t0, accuracy_m=5)]
            assert await fence_events(channel, device, scout, 1) == [ENTER]

        async with geofence_of(first).using(tenant):  # its processors wait
            van_in = [fix(1, *inside, t0 + 60_000, accuracy_m=5)]
            _, acks = await track_session(
                track_pb2_grpc.TrackSessionStub(to_a), "van", [van_in]
            )
            assert acks[0].acked_seq == 1
            away = [fix(2, AWAY_LAT, DEPOT_LON, t0 + 120_000, accuracy_m=5)]
            assert await fence_events(to_b, "van", away, 2) == [ENTER, EXIT]

        # The first server judges the van's fix at last; once the fix of a
        # device sent after it has its event stored, so has the van's.
        tail = [fix(1, *inside, t0 + 180_000, accuracy_m=5)]
        assert await fence_events(to_a, "tail", tail, 1) == [ENTER]
        await until_async(lambda: _equal(stored_kinds(to_a, "tail"), [ENTER]))
        assert await stored_kinds(to_a, "van") == [ENTER, EXIT]


async def _equal(found: Awaitable[list[int]], expected: list[int]) -> bool:
    return await found == expected
