"""Geofence memberships of devices moving between server processes (one PostgreSQL
and one Redis): the process that gets a device's fixes first reloads its
memberships from the stored events, in one query for all such devices of a batch,
and the process that held it lets it go (no stale DWELL, no missed ENTER). A single
process without Redis keeps its memberships in memory and reads the store once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

import pytest

from tests.geofence.support import summary
from tests.geofence.test_rules import FAR, INSIDE, T0, square
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import EventType, TrackingEvent, event_id
from tracking_grpc.geofence.processor import GeofenceProcessor
from tracking_grpc.servicers.geofence import FENCE_HOLDERS
from tracking_grpc.storage.fences import Membership
from tracking_grpc.storage.postgres_fences import (
    PostgresEventRepository,
    PostgresFenceRepository,
    PostgresGeofenceDatabase,
)
from tracking_grpc.storage.redis_client import Connection
from tracking_grpc.storage.redis_notices import RedisDeviceNotices

pytestmark = pytest.mark.postgres

DWELL_MS = 120_000
HANG_S = 30  # a hang guard: what is waited for comes far sooner
MANY = 2_500  # devices of one take-over: three notice entries


class CountedEvents(PostgresEventRepository):
    """The real event repository, counting the membership queries (by devices
    asked for; None: the whole tenant's)."""

    def __init__(self, db: PostgresGeofenceDatabase) -> None:
        super().__init__(db)
        self.asked: list[list[str] | None] = []

    async def memberships(
        self, tenant: str, devices: Sequence[str] | None = None
    ) -> list[Membership]:
        self.asked.append(None if devices is None else list(devices))
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


async def open_process(
    url: str, redis_url: str | None = None, prefix: str = ""
) -> tuple[Process, PostgresGeofenceDatabase]:
    db = await PostgresGeofenceDatabase.open(url)
    events = CountedEvents(db)
    processor = GeofenceProcessor(PostgresFenceRepository(db), events)
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


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(HANG_S):
        while not check():  # noqa: ASYNC110 - another task acts on a notice
            await asyncio.sleep(0.01)


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
    first, first_db = await open_process(geo_pg_url, redis_url, redis_prefix)
    second, second_db = await open_process(geo_pg_url, redis_url, redis_prefix)
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
async def test_the_process_a_device_left_raises_no_stale_dwell(
    two_processes, tenant
) -> None:
    a, b = two_processes
    assert summary(await a.feed(fixes(tenant, "van", (1, 0, INSIDE)))) == [("ENTER", 1)]
    await until(lambda: heard(b) == 1)  # a's take-over, before the van moves
    assert summary(await b.feed(fixes(tenant, "van", (2, 60, FAR)))) == [("EXIT", 2)]
    await until(lambda: heard(a) == 1)  # b's take-over

    # The stay ended on b before its DWELL was due: a's timer raises nothing.
    assert await a.processor.tick(T0 + 3_600_000) == []
    # Back on a, inside past the old stay's DWELL time: a new stay begins.
    back = await a.feed(fixes(tenant, "van", (3, 300, INSIDE)))
    assert summary(back) == [("ENTER", 3)]
    await until(lambda: heard(b) == 2)  # a's take-overs: the first, and now
    assert summary(await a.processor.tick(T0 + 3_600_000)) == [("DWELL", 3)]
    assert await b.processor.tick(T0 + 3_600_000) == []


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
    assert await a.processor.tick(T0 + 3_600_000) == []
    # Held now: the next batch of the same devices reads nothing.
    assert await b.feed(many(tenant, 3, 120, FAR)) == []
    assert len(b.events.asked) == queries + 1


async def test_a_single_process_keeps_its_memberships_in_memory(
    geo_pg_url: str, tenant: str
) -> None:
    """Without Redis there is no other process: the tenant's memberships are read
    once, and what is stored afterwards (an EXIT here, as a process of an older
    version elsewhere would store it) is not read again."""
    alone, db = await open_process(geo_pg_url)
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
