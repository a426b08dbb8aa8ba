"""The event store's queue is bounded: while the store is blocked (a lock, a slow or
absent database) the bus call waits for room, holding the event processors and,
behind them, the ingest back instead of filling memory; once the store takes events
again every one is stored once. A stop still keeps its deadline.

Real stores throughout: SQLite blocked by another connection's write transaction,
PostgreSQL by another connection's ``LOCK TABLE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from tests.server_fixtures import embedded_settings
from tracking_grpc.app import App, open_app
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import StorageUnavailable
from tracking_grpc.events import EventType, TrackingEvent
from tracking_grpc.geofence.delivery import EventStoreListener
from tracking_grpc.observability import metrics
from tracking_grpc.storage.fences import EventRepository
from tracking_grpc.storage.postgres_fences import (
    PostgresEventRepository,
    PostgresGeofenceDatabase,
)
from tracking_grpc.storage.sqlite_fences import (
    SqliteEventRepository,
    SqliteGeofenceDatabase,
)

LOGGER = "tracking_grpc.geofence.delivery"
HANG_GUARD_S = 120.0  # a safety net against a hang, not a measure
# A stop must not wait out SQLite's 10 s busy timeout on a blocked write.
STOP_GUARD_S = 8.0
NOT_STORED = (
    r"(?P<left>\d+) events not stored at the stop deadline"
    r"(?:, and a write of (?P<cut>\d+) more was cut off)?"
)
COUNT = "SELECT count(*), count(DISTINCT event_id) FROM geofence_events WHERE "


class SqliteBlock:
    """Another connection to the event file, holding its write lock."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)

    async def hold(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    async def writing(self) -> None:
        """The store's write is let begin (it then waits on the lock unseen)."""
        await asyncio.sleep(0.1)

    async def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    async def count(self, where: str, value: str) -> tuple[int, int]:
        return self.conn.execute(COUNT + f"{where} = ?", [value]).fetchone()

    async def close(self) -> None:
        await self.release()
        self.conn.close()


class PostgresBlock:
    """Another connection holding ACCESS EXCLUSIVE on the events table."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.AsyncConnection | None = None

    async def hold(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(self.url)
        await self.conn.execute("LOCK TABLE geofence_events IN ACCESS EXCLUSIVE MODE")

    async def writing(self) -> None:
        """Until the store's write waits for the lock."""
        async with (
            asyncio.timeout(HANG_GUARD_S),
            await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn,
        ):
            while not await _waits_for_lock(conn):  # noqa: ASYNC110 - polls the server
                await asyncio.sleep(0.01)

    async def release(self) -> None:
        if self.conn is not None:
            await self.conn.rollback()
            await self.conn.close()
            self.conn = None

    async def count(self, where: str, value: str) -> tuple[int, int]:
        async with await psycopg.AsyncConnection.connect(self.url) as conn:
            cur = await conn.execute(COUNT + f"{where} = %s", [value])
            found = await cur.fetchone()
        assert found is not None
        return found[0], found[1]

    async def close(self) -> None:
        await self.release()


async def _waits_for_lock(conn: psycopg.AsyncConnection) -> bool:
    cur = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO geofence_events%'"
    )
    found = await cur.fetchone()
    return found is not None and found[0] > 0


Block = SqliteBlock | PostgresBlock


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def blockable(
    request: pytest.FixtureRequest, tmp_path: Path, tenant: str
) -> AsyncIterator[tuple[EventRepository, Block]]:
    """An event repository of one backend, and what blocks its writes. On
    PostgreSQL (a database the session's tests share) the test's events are
    deleted afterwards: thousands left unpublished would be older than, and so
    hide, the events of the outbox tests that run later."""
    if request.param == "sqlite":
        path = tmp_path / "geofence.sqlite3"
        sqlite = await SqliteGeofenceDatabase.open(path)
        block: Block = SqliteBlock(path)
        yield SqliteEventRepository(sqlite), block
        await block.close()
        await sqlite.close()
        return
    url = request.getfixturevalue("geo_pg_url")
    postgres = await PostgresGeofenceDatabase.open(url)
    block = PostgresBlock(url)
    yield PostgresEventRepository(postgres), block
    await block.close()
    await postgres.close()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("DELETE FROM geofence_events WHERE tenant = %s", [tenant])


def events(tenant: str, first: int, n: int) -> list[TrackingEvent]:
    return [
        TrackingEvent(
            f"q{i}", tenant, "van-1", EventType.ENTER, 1000 + i, 52.5, 13.4, i, 0,
            fence_id="depot",
        )
        for i in range(first, first + n)
    ]  # fmt: skip


async def until(done: Callable[[], bool]) -> None:
    """Wait until ``done()`` holds, looking every 10 ms."""
    async with asyncio.timeout(HANG_GUARD_S):
        while not done():  # noqa: ASYNC110 - polls the state of other tasks
            await asyncio.sleep(0.01)


def not_stored(log: str) -> int:
    """Events the stop's log line says are not (or perhaps not) stored."""
    found = re.search(NOT_STORED, log)
    assert found is not None, log
    return int(found["left"]) + int(found["cut"] or 0)


async def test_a_blocked_store_holds_the_emitter_at_the_bound(
    blockable, tenant, caplog
) -> None:
    repository, block = blockable
    registry = metrics.enable()
    store = EventStoreListener(repository, max_queued=2_500)
    store.start()
    parts = [events(tenant, 700 * k, 700) for k in range(5)]
    parts.append(events(tenant, 3_500, 3_000))  # one call above the bound
    seen: list[int] = []

    async def emit() -> None:
        for part in parts:
            await store(part)
            seen.append(store.queued)

    try:
        await block.hold()
        with caplog.at_level(logging.WARNING, LOGGER):
            emitter = asyncio.create_task(emit())
            await until(lambda: store.queued == 2_500)
            await asyncio.sleep(0.1)  # room for the emitter to overrun, were it free
            assert store.queued == 2_500
            assert not emitter.done()
            assert registry.get_sample_value("tracking_event_store_queued") == 2_500

            await block.release()
            async with asyncio.timeout(HANG_GUARD_S):
                await emitter
                await store.close()
        assert registry.get_sample_value("tracking_event_store_queued") == 0
    finally:
        metrics.disable()

    assert max(seen) <= 2_500
    assert await block.count("tenant", tenant) == (6_500, 6_500)
    assert caplog.text.count("event store queue full") == 1
    assert caplog.text.count("event store queue drained") == 1


async def test_a_stop_with_a_full_queue_and_a_blocked_store_keeps_its_deadline(
    blockable, tenant, caplog
) -> None:
    repository, block = blockable
    store = EventStoreListener(repository, max_queued=1_000)
    store.start()
    await block.hold()
    emitter = asyncio.create_task(store(events(tenant, 0, 3_000)))
    await until(lambda: store.queued == 1_000)
    await block.writing()

    with caplog.at_level(logging.WARNING, LOGGER):
        async with asyncio.timeout(STOP_GUARD_S):
            await store.close(asyncio.get_running_loop().time() + 0.2)
            await emitter  # let go, its events counted as not stored

    assert not_stored(caplog.text) == 3_000


async def test_an_erasure_drops_the_queued_events_of_the_device(
    blockable, tenant
) -> None:
    """Events of an erased device still queued are dropped; a write of some under
    way is waited for (the erasure then deletes what it stored): none is stored
    after the erasure, and the other devices' events all are."""
    repository, block = blockable
    store = EventStoreListener(repository, max_queued=10_000)
    store.start()
    van = events(tenant, 0, 1_500)
    truck = [
        replace(event, event_id=f"t{n}", device="truck")
        for n, event in enumerate(events(tenant, 0, 300))
    ]
    await block.hold()
    await store(van[:1_000])  # one write's chunk, waiting on the lock
    await block.writing()
    await store(van[1_000:] + truck)

    forgetting = asyncio.create_task(store.forget_device(tenant, "van-1"))
    await until(lambda: store.queued == 1_000 + len(truck))
    assert not forgetting.done()  # the write of the van's events is under way
    await block.release()
    async with asyncio.timeout(HANG_GUARD_S):
        await forgetting
    assert await repository.erase_device(tenant, "van-1") == 1_000
    async with asyncio.timeout(HANG_GUARD_S):
        await store.flushed()
        await store.close()

    assert await block.count("tenant", tenant) == (len(truck), len(truck))


class EventPerFix:
    """A processor raising one event per stored fix, on route ``queue-test``."""

    name = "event-per-fix"

    def __init__(self) -> None:
        self.fixes = 0

    async def process(self, stored: FixBatch) -> list[TrackingEvent]:
        self.fixes += len(stored)
        rows = zip(
            stored.device, stored.seq.tolist(), stored.time_ms.tolist(), strict=True
        )
        return [
            TrackingEvent(
                f"{device}-{seq}", stored.tenant, device, EventType.ETA_UPDATED,
                time_ms, 52.5, 13.4, seq, 0, route_id="queue-test",
            )
            for device, seq, time_ms in rows
        ]  # fmt: skip


FIXES = 400  # past the bound, the processors' queue (256 commits) and one more
EVENT_BOUND = 20


def one_fix(seq: int) -> FixBatch:
    now = time.time_ns() // 1_000_000
    return FixBatch.from_columns(
        "default", ["van-1"], [seq], [now - 600_000 + seq * 1000], [52.5], [13.4],
        received_ms=now,
    )  # fmt: skip


class BlockedPipeline:
    """An app whose processors raise one event per fix into an event store with
    room for ``EVENT_BOUND``, its file locked; one fix per commit is submitted
    until the ingest waits for space."""

    def __init__(self, app: App, store: EventStoreListener, block: SqliteBlock):
        self.app = app
        self.store = store
        self.block = block
        self.processor = EventPerFix()
        app.pipeline.add_processor(self.processor)
        self.acked = 0
        self.submitter = asyncio.create_task(self._submit())
        self._closed = False

    async def _submit(self) -> None:
        for seq in range(1, FIXES + 1):
            await self.app.pipeline.ingest(one_fix(seq))
            self.acked += 1

    def stalled(self) -> bool:
        """The event queue is full, the processors' queue too, and the ingest
        waits for space (or is about to): nothing moves until the store takes
        events."""
        pipeline = self.app.pipeline
        return (
            self.store.queued == EVENT_BOUND
            and pipeline._processing.full()  # private: 256 commits wait
            and pipeline.admission.congested
        )

    def fixes_stored(self) -> int:
        path = Path(self.app.settings.data_dir) / "history.sqlite3"
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return conn.execute("SELECT count(*) FROM fixes").fetchone()[0]

    async def close(self, deadline: float | None = None) -> None:
        """Close the app (once), the event store among its drains."""
        if not self._closed:
            self._closed = True
            await self.app.close(deadline)


@pytest.fixture
async def blocked_pipeline(tmp_path: Path) -> AsyncIterator[BlockedPipeline]:
    settings = embedded_settings(
        tmp_path,
        flush_interval_ms=0.0,
        processor_interval_ms=0.0,
        max_pending_fixes=1,
        sqlite_synchronous="OFF",
        activity_checkpoint_s=0.0,
    )
    app = await open_app(settings)
    path = tmp_path / "geofence.sqlite3"
    database = await SqliteGeofenceDatabase.open(path)
    store = EventStoreListener(SqliteEventRepository(database), EVENT_BOUND)
    store.start()
    app.bus.add_listener(store)
    app.drains.append(store.close)  # as the Geofence service adds it
    block = SqliteBlock(path)
    await block.hold()
    blocked = BlockedPipeline(app, store, block)
    yield blocked
    await block.close()
    await blocked.close(asyncio.get_running_loop().time())
    blocked.submitter.cancel()
    await asyncio.gather(blocked.submitter, return_exceptions=True)
    await database.close()


async def test_a_full_event_queue_pauses_the_ingest_and_loses_nothing(
    blocked_pipeline,
) -> None:
    blocked = blocked_pipeline
    await until(blocked.stalled)
    await asyncio.sleep(0.2)  # room for the ingest to go on, were it free
    assert not blocked.submitter.done()
    assert blocked.acked < FIXES
    assert blocked.fixes_stored() >= blocked.acked  # an ack still means stored

    await blocked.block.release()
    async with asyncio.timeout(HANG_GUARD_S):
        await blocked.submitter
        await blocked.close()  # no deadline: every fix processed, every event stored

    assert blocked.acked == FIXES
    assert blocked.fixes_stored() == FIXES
    assert blocked.processor.fixes == FIXES
    assert await blocked.block.count("route_id", "queue-test") == (FIXES, FIXES)


async def test_a_stop_of_a_stalled_pipeline_keeps_its_deadline(
    blocked_pipeline, caplog
) -> None:
    blocked = blocked_pipeline
    await until(blocked.stalled)

    with caplog.at_level(logging.WARNING, LOGGER):
        async with asyncio.timeout(STOP_GUARD_S):
            await blocked.close(asyncio.get_running_loop().time() + 0.2)
    with pytest.raises(StorageUnavailable):
        await blocked.submitter  # its last fix was not taken: the device keeps it
    assert blocked.fixes_stored() == blocked.acked
    assert not_stored(caplog.text) > 0
