"""Outages of private Redis and PostgreSQL servers that the tests stop and restart.

Redis down: live calls fail with Unavailable (never hang), and once it is back the
repairer rebuilds the lost live state from history and brokers register their
watch interest again. PostgreSQL down: stores fail with
StorageUnavailable, and the same store object works again when it returns.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import psycopg
import pytest

from tests.backends import (
    PG_ADMIN_URL,
    create_database,
    drop_database,
    require_service,
    unique_tenant,
)
from tests.services import PostgresServer, RedisServer
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import StorageUnavailable, Unavailable
from tracking_grpc.events import EventType, TrackingEvent, event_id
from tracking_grpc.interest import TenantInterest
from tracking_grpc.storage import schema
from tracking_grpc.storage.live_repair import LiveRepairer
from tracking_grpc.storage.postgres import PostgresHistoryStore
from tracking_grpc.storage.postgres_fences import (
    PostgresEventRepository,
    PostgresFenceRepository,
    PostgresGeofenceDatabase,
)
from tracking_grpc.storage.redis_broker import RedisBroker
from tracking_grpc.storage.redis_live import RedisLiveStore

pytestmark = pytest.mark.slow
T0 = 1_750_000_000_000


@pytest.fixture
def private_redis(tmp_path):
    try:
        server = RedisServer(tmp_path)
    except FileNotFoundError as exc:
        require_service("redis-server", str(exc))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def private_postgres():
    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        require_service("PostgreSQL binaries", str(exc))
    server.start()
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE tracking")
    asyncio.run(schema.migrate(server.url("tracking")))
    yield server
    server.destroy()


def fixes(tenant: str, first_seq: int, count: int) -> FixBatch:
    seqs = range(first_seq, first_seq + count)
    return FixBatch.from_rows(
        tenant, [("dev", s, T0 + 1000 * s, 40.0 + s * 1e-4, -74.0) for s in seqs]
    )


async def test_live_calls_fail_fast_while_redis_is_down(private_redis) -> None:
    live = await RedisLiveStore.open(private_redis.url, "t:")
    private_redis.stop()
    started = time.monotonic()
    for call in (live.update(fixes("t", 1, 3)), live.nearby("t", 40, -74, 100.0, 5)):
        with pytest.raises(Unavailable, match="unavailable"):
            await call
    assert time.monotonic() - started < 10
    assert live.needs_rebuild
    await live.close()


async def test_a_redis_that_refuses_writes_is_an_outage(private_redis) -> None:
    """READONLY (a replica, as during a failover) and OOM come from Redis's state:
    the update fails as Unavailable and the live state is marked for a rebuild,
    instead of a logged error and positions silently left behind."""
    live = await RedisLiveStore.open(private_redis.url, "t:")
    await live.update(fixes("t", 1, 1))
    private_redis.command("REPLICAOF", "127.0.0.1", "1")  # a master that is not there
    with pytest.raises(Unavailable, match="read only replica"):
        await live.update(fixes("t", 2, 1))
    assert live.needs_rebuild
    private_redis.command("REPLICAOF", "NO", "ONE")
    assert len(await live.update(fixes("t", 3, 1))) == 1
    await live.close()


async def test_live_state_is_rebuilt_from_history_after_redis_restart(
    private_redis, pg_url
) -> None:
    history = await PostgresHistoryStore.open(pg_url)
    live = await RedisLiveStore.open(private_redis.url, "t:")
    repairer = LiveRepairer(history, live)
    tenant = unique_tenant()
    await history.store(fixes(tenant, 1, 5))
    await live.update(fixes(tenant, 1, 5))
    private_redis.stop()
    assert not await repairer.check()
    private_redis.start()  # empty: nothing was persisted
    assert await repairer.check()
    assert (await live.get(tenant, ["dev"])).seq.tolist() == [5]
    await asyncio.gather(live.close(), history.close())


async def test_the_repairer_lets_watchers_catch_up_after_a_rebuild(
    private_redis, pg_url
) -> None:
    """A fix stored while Redis was down is in the live store once rebuilt; then,
    not before, the watchers catch up (WatchHub.catch_up)."""
    history = await PostgresHistoryStore.open(pg_url)
    live = await RedisLiveStore.open(private_redis.url, "t:")
    tenant = unique_tenant()
    seen: list[list[int]] = []

    async def catch_up() -> None:
        seen.append((await live.get(tenant, ["dev"])).seq.tolist())

    repairer = LiveRepairer(history, live, on_rebuilt=catch_up)
    await history.store(fixes(tenant, 1, 1))
    await live.update(fixes(tenant, 1, 1))
    assert await repairer.check() and seen == []  # nothing to rebuild
    private_redis.stop()
    assert not await repairer.check()
    await history.store(fixes(tenant, 2, 1))  # its live update was skipped
    private_redis.start()
    assert await repairer.check()
    assert seen == [[2]]
    await asyncio.gather(live.close(), history.close())


async def test_broker_resubscribes_after_redis_restart(private_redis) -> None:
    publisher = await RedisBroker.open(private_redis.url, "t:")
    subscriber = await RedisBroker.open(private_redis.url, "t:")
    received: list[FixBatch] = []
    wants = {"t": TenantInterest(everything=True)}
    await subscriber.subscribe(lambda batch: _append(received, batch), lambda: wants)
    await subscriber.interest_changed()
    private_redis.stop()
    private_redis.start()  # empty: the subscriber registers its interest again
    async with asyncio.timeout(15):
        while not received:
            try:
                await publisher.publish(fixes("t", 1, 1))
            except Unavailable:
                pass
            await asyncio.sleep(0.2)
    assert received[0].seq.tolist() == [1]
    await asyncio.gather(publisher.close(), subscriber.close())


async def test_a_resubscribed_broker_catches_up_once_its_interest_is_back(
    private_redis,
) -> None:
    """Updates published while the subscription was lost are gone: once it is back
    and the interest registered again (later updates reach it), the subscriber is
    told to catch up from the live store."""
    subscriber = await RedisBroker.open(private_redis.url, "t:")
    registered: list[bool] = []
    caught_up = asyncio.Event()

    async def catch_up() -> None:
        _, entries = await subscriber.table.read({})
        registered.append(subscriber.process in entries)
        caught_up.set()

    wants = {"t": TenantInterest(everything=True)}
    handler = lambda batch: _append([], batch)  # noqa: E731
    await subscriber.subscribe(handler, lambda: wants, catch_up)
    await subscriber.interest_changed()
    assert registered == []  # the first subscription missed nothing
    private_redis.stop()
    private_redis.start()  # empty: the interest must be registered again first
    await asyncio.wait_for(caught_up.wait(), 15)
    assert registered == [True]
    await subscriber.close()


async def test_history_store_recovers_when_postgres_returns(private_postgres) -> None:
    url = private_postgres.url("tracking")
    history = await PostgresHistoryStore.open(url, pool_timeout_s=1.0)
    tenant = unique_tenant()
    assert (await history.store(fixes(tenant, 1, 10))).all()
    private_postgres.stop()
    with pytest.raises(StorageUnavailable):
        await history.store(fixes(tenant, 11, 10))
    with pytest.raises(StorageUnavailable):
        await history.ping()
    private_postgres.start()
    async with asyncio.timeout(20):
        while True:
            try:
                mask = await history.store(fixes(tenant, 11, 10))
                break
            except StorageUnavailable:
                await asyncio.sleep(0.2)
    assert mask.all() and await history.count(tenant) == 20
    await history.close()


async def test_a_store_blocked_by_a_lock_gives_up_and_is_retried(
    private_postgres,
) -> None:
    """A write waiting on a lock (LOCK TABLE, a long ALTER TABLE, a stuck
    migration) gives up after ``database_timeout_s`` as a wait for a connection
    does, so the pipeline logs the outage and retries; it used to wait without
    limit, holding every ack with nothing said."""
    url = private_postgres.url("tracking")
    history = await PostgresHistoryStore.open(url, pool_timeout_s=1.0)
    tenant = unique_tenant()
    assert (await history.store(fixes(tenant, 1, 10))).all()
    locker = await psycopg.AsyncConnection.connect(url)
    await locker.execute("LOCK TABLE fixes IN ACCESS EXCLUSIVE MODE")  # held
    try:
        with pytest.raises(StorageUnavailable, match="lock timeout"):
            await asyncio.wait_for(history.store(fixes(tenant, 11, 10)), 30)
    finally:
        await locker.rollback()
        await locker.close()
    assert (await history.store(fixes(tenant, 11, 10))).all()  # the retry
    assert await history.count(tenant) == 20
    await history.close()


def entered(tenant: str) -> TrackingEvent:
    return TrackingEvent(
        event_id(tenant, "van", EventType.ENTER, 1, "depot"), tenant, "van",
        EventType.ENTER, 1, 52.5, 13.4, 1, 1, fence_id="depot",
    )  # fmt: skip


async def test_an_event_write_blocked_by_a_lock_gives_up(private_postgres) -> None:
    """The geofence database's pool has the same lock timeout: the event store's
    listener then logs and retries instead of waiting unseen."""
    url = private_postgres.url("tracking")
    database = await PostgresGeofenceDatabase.open(url, timeout_s=1.0)
    events = PostgresEventRepository(database)
    locker = await psycopg.AsyncConnection.connect(url)
    await locker.execute("LOCK TABLE geofence_events IN ACCESS EXCLUSIVE MODE")
    try:
        with pytest.raises(StorageUnavailable, match="lock timeout"):
            await asyncio.wait_for(events.add([entered(unique_tenant())]), 30)
    finally:
        await locker.rollback()
        await locker.close()
        await database.close()


async def _append(inbox: list, batch: FixBatch) -> None:
    inbox.append(batch)


@pytest.fixture
def own_database(pg_session_prefix: str, pg_template: str):
    """A migrated database of this test alone: its backends may be terminated."""
    name = f"{pg_session_prefix}_{uuid.uuid4().hex[:8]}"
    url = create_database(name, template=pg_template)
    yield name, url
    drop_database(name)


def terminate_backends(database: str) -> None:
    """What a restarted server or an administrator does to a database's sessions."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        others = "datname = %s AND pid <> pg_backend_pid()"
        conn.execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {others}",
            [database],
        )
        count = f"SELECT count(*) FROM pg_stat_activity WHERE {others}"
        while conn.execute(count, [database]).fetchone() != (0,):
            time.sleep(0.05)


async def fill_pool(pool, count: int) -> None:
    """Leave ``count`` idle connections in the pool (all of them to be dropped)."""
    leased = [await pool.getconn() for _ in range(count)]
    for conn in leased:
        await pool.putconn(conn)


@pytest.mark.parametrize("call", ["read", "transaction"])
async def test_fence_database_serves_at_once_after_its_connections_were_dropped(
    own_database, call
) -> None:
    """The server is up again (it never went): the next call gets a fresh connection.

    With a checking pool, psycopg_pool slept 1, 2, 4 ... s after each dead pooled
    connection, so a caller (the geofence processor, which the acks wait for) waited
    through all four, past the pool's timeout, for a server that was there.
    """
    name, url = own_database
    database = await PostgresGeofenceDatabase.open(url, max_size=4, timeout_s=5.0)
    try:
        await fill_pool(database.pool, 4)
        terminate_backends(name)
        if call == "read":
            assert await PostgresFenceRepository(database).revision("t") == 0
        else:
            await PostgresEventRepository(database).mark_published([])
        assert await database.fetch("SELECT 1", []) == [(1,)]
    finally:
        await database.close()


async def test_history_store_reads_at_once_after_its_connections_were_dropped(
    own_database,
) -> None:
    """A read after the server dropped the pooled connections (an administrator,
    a failover) is served on a fresh one instead of failing: the device lookup of
    a new Track session is such a read, and its failure ended the stream."""
    name, url = own_database
    store = await PostgresHistoryStore.open(url, max_connections=4)
    try:
        await fill_pool(store._pool, 4)
        terminate_backends(name)
        assert await store.device_states("t", ["a"]) == {}
        terminate_backends(name)
        assert len(await store.history("t", "a", 0, 2**62)) == 0
    finally:
        await store.close()
