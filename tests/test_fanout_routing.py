"""Live updates routed by watch interest, on Redis and on a Redis Cluster.

Brokers stand for server processes (each has its own id and channel); the last
tests run whole servers on PostgreSQL and Redis. A process learns that nothing else
came its way by a marker: pub/sub keeps one publisher's messages to one channel in
order, so once the marker has arrived, everything sent before it has too. The
geofence event feed, the other cross-process stream, is read only while watched.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import grpc
import pytest
import redis.asyncio as aioredis
from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc

from tests.backends import unique_tenant
from tests.geofence.support import RecordingHub
from tests.server_fixtures import embedded_settings, fix, now_ms, track_session
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import EventType, TrackingEvent
from tracking_grpc.geofence.delivery import (
    EventFilter,
    StreamWatchFeed,
    stream_fields,
)
from tracking_grpc.interest import Interest, TenantInterest
from tracking_grpc.storage.redis_broker import RedisBroker
from tracking_grpc.storage.redis_client import Connection

pytestmark = pytest.mark.slow
T0 = 1_750_000_000_000


class Process:
    """A broker with an inbox and an interest the test changes."""

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.wants: dict[str, TenantInterest] = {}
        self.inbox: list[FixBatch] = []

    async def want(self, wants: Interest) -> None:
        self.wants = dict(wants)
        await self.broker.interest_changed()

    async def _receive(self, batch: FixBatch) -> None:
        self.inbox.append(batch)

    def devices(self) -> list[str]:
        return sorted(d for b in self.inbox for d in b.device.tolist())

    async def until(self, count: int) -> None:
        async with asyncio.timeout(10):
            while sum(map(len, self.inbox)) < count:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


@pytest.fixture
async def processes(any_redis_url, redis_prefix):
    made: list[Process] = []

    async def make(ttl_s: float = 30.0) -> Process:
        broker = await RedisBroker.open(any_redis_url, redis_prefix, ttl_s)
        process = Process(broker)
        await broker.subscribe(process._receive, lambda: process.wants)
        made.append(process)
        return process

    yield make
    await asyncio.gather(*(p.broker.close() for p in made), return_exceptions=True)


def positions(tenant: str, rows: list[tuple[str, float, float]]) -> FixBatch:
    return FixBatch.from_rows(
        tenant, [(d, i + 1, T0 + i, lat, lon) for i, (d, lat, lon) in enumerate(rows)]
    )


async def test_updates_reach_only_the_processes_that_want_them(processes) -> None:
    a, b, c, idle = [await processes() for _ in range(4)]
    tenant, other = unique_tenant(), unique_tenant()
    await b.want(
        {tenant: TenantInterest(devices=frozenset({"d1"}), boxes=((10, 10, 11, 11),))}
    )
    await c.want({other: TenantInterest(everything=True)})
    sent = [("d1", 0.0, 0.0), ("d2", 10.5, 10.5), ("d3", 50.0, 50.0)]
    await a.broker.publish(positions(tenant, sent))
    await a.broker.publish(positions(other, [("marker", 1.0, 1.0)]))
    await b.until(2)
    await c.until(1)
    assert b.devices() == ["d1", "d2"] and b.broker.received_fixes == 2
    assert c.devices() == ["marker"] and c.broker.received_fixes == 1
    assert idle.broker.received_fixes == 0
    routed = {ch for routes in a.broker._routes.values() for ch in routes}
    assert routed == {b.broker.channel, c.broker.channel}


async def test_a_publisher_with_a_stale_table_reaches_a_new_watcher(processes):
    a, b = await processes(), await processes()
    tenant = unique_tenant()
    await a.broker.publish(positions(tenant, [("d1", 1.0, 1.0)]))  # cached: nobody
    cached = a.broker._version
    await b.want({tenant: TenantInterest(devices=frozenset({"d1"}))})
    await a.broker.publish(positions(tenant, [("d1", 2.0, 2.0)]))
    await b.until(1)
    assert b.inbox[0].lat.tolist() == [2.0] and a.broker._version != cached


async def test_interest_shrinks_when_watchers_leave(processes) -> None:
    a, b = await processes(), await processes()
    tenant = unique_tenant()
    await b.want({tenant: TenantInterest(devices=frozenset({"d1"}))})
    await a.broker.publish(positions(tenant, [("d1", 1.0, 1.0)]))
    await b.until(1)
    await b.want({tenant: TenantInterest(devices=frozenset({"d9"}))})
    # Sent with A's cached table, then A reads the new one: d1 may come once more
    # (more than wanted is allowed: watchers filter), never after.
    await a.broker.publish(positions(tenant, [("d1", 2.0, 2.0)]))
    await a.broker.publish(positions(tenant, [("d1", 4.0, 4.0), ("d9", 3.0, 3.0)]))
    async with asyncio.timeout(10):
        while "d9" not in b.devices():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert b.inbox[-1].device.tolist() == ["d9"]
    assert 4.0 not in [x for batch in b.inbox for x in batch.lat.tolist()]


@pytest.mark.parametrize("any_redis_url", ["redis"], indirect=True)  # PSUBSCRIBE
async def test_updates_nobody_watches_are_not_sent(redis_url, redis_prefix, processes):
    a, b = await processes(), await processes()
    tenant, watched = unique_tenant(), unique_tenant()
    await b.want({watched: TenantInterest(everything=True)})
    sniffer = aioredis.Redis.from_url(redis_url).pubsub()
    await sniffer.psubscribe(f"{redis_prefix}fanout:*")
    await a.broker.publish(positions(tenant, [("d1", 1.0, 1.0)]))
    await a.broker.publish(positions(watched, [("marker", 1.0, 1.0)]))
    seen = []
    async with asyncio.timeout(10):
        while not seen or seen[-1] != b.broker.channel:
            message = await sniffer.get_message(True, timeout=1.0)
            if message is not None:
                seen.append(message["channel"].decode())
    assert seen == [b.broker.channel]
    await sniffer.aclose()


async def test_the_interest_of_a_dead_process_expires(processes) -> None:
    a, dead = await processes(ttl_s=0.6), await processes(ttl_s=0.6)
    tenant = unique_tenant()
    await dead.want({tenant: TenantInterest(everything=True)})
    for task in dead.broker._tasks:  # killed: no heartbeat, no goodbye
        task.cancel()
    assert await listed(a, dead)
    async with asyncio.timeout(10):  # a's heartbeats expire dead's entry
        while await listed(a, dead):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    await a.broker.publish(positions(tenant, [("d1", 1.0, 1.0)]))
    assert tenant not in a.broker._routes


async def listed(reader: Process, process: Process) -> bool:
    return process.broker.process in (await reader.broker.table.read({}))[1]


async def test_a_closed_process_leaves_the_table(processes) -> None:
    a, b = await processes(), await processes()
    await b.want({unique_tenant(): TenantInterest(everything=True)})
    await b.broker.close()
    assert not await listed(a, b)


# Whole servers on PostgreSQL and Redis (or a Redis Cluster).


@pytest.fixture
async def servers(any_redis_url, redis_prefix, pg_url, start_server, tmp_path):
    async def start(name: str):
        settings = replace(
            embedded_settings(tmp_path), database_url=pg_url, redis_url=any_redis_url,
            redis_key_prefix=redis_prefix, data_dir=str(tmp_path / name),
        )  # fmt: skip
        return await start_server(settings=settings)

    return start


def watch(channel: grpc.aio.Channel, **request) -> grpc.aio.UnaryStreamCall:
    stub = track_pb2_grpc.TrackSessionStub(channel)
    return stub.Watch(track_pb2.WatchRequest(**request))


async def updates(call: grpc.aio.UnaryStreamCall) -> list[str]:
    response = await asyncio.wait_for(call.read(), 10)
    while response.snapshot:
        response = await asyncio.wait_for(call.read(), 10)
    return [p.device_id for p in response.positions]


async def test_watchers_on_other_servers_get_only_what_they_watch(servers) -> None:
    a, b, c, idle = [await servers(name) for name in "abcd"]
    box = common_pb2.Area(
        box=common_pb2.BoundingBox(south=10.0, west=10.0, north=11.0, east=11.0)
    )
    suffix = uuid.uuid4().hex[:6]
    d1, d2, d3, dc = (f"{n}-{suffix}" for n in ("d1", "d2", "d3", "dc"))
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as to_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as to_b,
        grpc.aio.insecure_channel(f"127.0.0.1:{c.port}") as to_c,
    ):
        by_device = watch(to_b, device_ids=[d1])
        by_area = watch(to_b, area=box)
        on_c = watch(to_c, device_ids=[dc])
        for call in (by_device, by_area, on_c):  # registered before the snapshot
            while not (await asyncio.wait_for(call.read(), 10)).snapshot_done:
                pass  # positions of earlier tests, rebuilt from the shared history
        stub = track_pb2_grpc.TrackSessionStub(to_a)
        t = now_ms() - 10_000
        for device, lat in ((d1, 5.0), (d2, 10.5), (d3, 50.0), (dc, 20.0)):
            await track_session(stub, device, [[fix(1, lat, lat, t)]])
        assert await updates(by_device) == [d1]
        assert await updates(by_area) == [d2]
        assert await updates(on_c) == [dc]
        for call in (by_device, by_area, on_c):
            call.cancel()
    assert c.app.broker.received_fixes == 1  # sent after the others: all arrived
    assert idle.app.broker.received_fixes == 0
    assert b.app.broker.received_fixes == 2


async def test_an_update_after_the_snapshot_read_reaches_the_watcher(
    servers, monkeypatch
) -> None:
    """The live write lands between the watcher's snapshot read and its first
    update, from a publisher whose table predates the watcher."""
    a, b = await servers("a"), await servers("b")
    tenant, device = "default", f"late-{uuid.uuid4().hex[:6]}"
    t = now_ms() - 10_000
    await a.app.broker.table.register("gone", {}, 1000)  # the version exists
    await a.app.pipeline.ingest(FixBatch.from_rows(tenant, [(device, 1, t, 1.0, 1.0)]))
    await _until(lambda: a.app.broker._version is not None)  # A's table: nobody
    cached = a.app.broker._version
    read_snapshot = b.app.live.snapshot
    registered: list[bool] = []

    async def snapshot_then_write(tenant_: str) -> FixBatch:
        table = await b.app.broker.table.read({})
        registered.append(b.app.broker.process in table[1])
        snapshot = await read_snapshot(tenant_)
        assert a.app.broker._version == cached  # still A's stale table
        late = FixBatch.from_rows(tenant, [(device, 2, t + 1, 2.0, 2.0)])
        await a.app.pipeline.ingest(late)
        await _until_live(a, seq=2)
        return snapshot

    monkeypatch.setattr(b.app.live, "snapshot", snapshot_then_write)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as to_b:
        call = watch(to_b, device_ids=[device])
        first = await asyncio.wait_for(call.read(), 10)
        assert first.snapshot and [p.seq for p in first.positions] == [1]
        assert await updates(call) == [device]
        call.cancel()
    assert registered == [True] and a.app.broker._version != cached


async def _until(check) -> None:
    async with asyncio.timeout(10):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def _until_live(server, seq: int) -> None:
    """Until the server's pipeline has made ``seq`` live (its publish follows)."""
    async with asyncio.timeout(10):
        while True:
            found = await server.app.live.snapshot("default")
            if seq in found.seq.tolist():
                return
            await asyncio.sleep(0.01)


def fence_event(event_id: str) -> TrackingEvent:
    return TrackingEvent(
        event_id, "t", "van", EventType.ENTER, 1, 1.0, 1.0, 1, 1, fence_id="depot"
    )


async def test_the_event_feed_reads_the_stream_only_while_watched(
    redis_url, redis_prefix
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    stream = redis_prefix + "geofence-events"
    hub = RecordingHub()
    feed = StreamWatchFeed(Connection(redis_url), stream, hub)
    feed.start()
    await client.xadd(stream, stream_fields(fence_event("unwatched")))
    subscription = hub.subscribe(EventFilter("t"))
    await asyncio.wait_for(hub.following.wait(), 10)
    await client.xadd(stream, stream_fields(fence_event("watched")))
    got = await asyncio.wait_for(subscription.queue.get(), 10)
    assert [e.event_id for e in got] == ["watched"]
    assert [e.event_id for e in hub.seen] == ["watched"]
    await asyncio.gather(feed.close(), client.aclose())
