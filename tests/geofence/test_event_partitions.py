"""The event stream split into partitions by device (``event_stream_partitions``),
on a standalone Redis and on a Redis Cluster: each event lands in its device's
partition, in order; the watch feed reads them all; erasure walks the device's
partition alone and retention every one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from redis.crc import key_slot

from tests.geofence.support import (
    RecordingHub,
    depot_watched_elsewhere,
    enter_depot,
)
from tests.server_fixtures import embedded_settings
from tracking_grpc.events import EventType, TrackingEvent
from tracking_grpc.geofence.delivery import (
    EventFilter,
    StreamPublisher,
    StreamWatchFeed,
    event_of_stream,
    stream_fields,
)
from tracking_grpc.geofence.partitions import EventStreams, partition_of
from tracking_grpc.geofence.stream_trim import EventStreamTrimmer
from tracking_grpc.retention import DAY_MS
from tracking_grpc.servicers.geofence import GEOFENCE_STREAM
from tracking_grpc.storage.redis_client import Client, Connection, connect
from tracking_grpc.storage.sqlite_fences import (
    SqliteEventRepository,
    SqliteGeofenceDatabase,
)

pytestmark = pytest.mark.redis

PARTITIONS = 4
CUTOFF_MS = 1_700_000_000_000 // DAY_MS * DAY_MS


@pytest.mark.parametrize(
    ("tenant", "device", "partitions", "expected"),
    [
        pytest.param("default", "van-7", 1, 0, id="one-partition"),
        pytest.param("default", "van-7", 4, 2, id="van-7-of-4"),
        pytest.param("default", "van-8", 4, 3, id="van-8-of-4"),
        pytest.param("acme", "van-7", 16, 2, id="other-tenant-of-16"),
    ],
)
def test_a_device_partition_is_crc32_of_tenant_nul_device(
    tenant, device, partitions, expected
) -> None:
    """Consumers compute it too: a change here breaks them."""
    assert partition_of(tenant, device, partitions) == expected


def test_one_partition_keeps_the_one_key() -> None:
    streams = EventStreams("trk:geofence-events", 1)
    assert streams.keys() == ["trk:geofence-events"]
    assert streams.key_of("default", "van-7") == "trk:geofence-events"


def test_partition_keys_spread_over_cluster_slots() -> None:
    keys = EventStreams("trk:geofence-events", 16).keys()
    assert keys[3] == "trk:geofence-events:3"
    slots = {key_slot(key.encode()) for key in keys}
    assert len(slots) == 16
    assert {slot * 3 // 16_384 for slot in slots} == {0, 1, 2}  # each third


@pytest.fixture
async def streams(any_redis_url: str) -> AsyncIterator[tuple[Client, EventStreams]]:
    """A client and partitioned stream keys of this test alone (deleted after)."""
    client = await connect(any_redis_url)
    found = EventStreams(f"part-test-{uuid.uuid4().hex[:10]}:events", PARTITIONS)
    yield client, found
    for key in [found.name, *found.keys()]:
        await client.delete(key)
    await client.aclose()


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[SqliteEventRepository]:
    database = await SqliteGeofenceDatabase.open(tmp_path / "geofence.sqlite3")
    yield SqliteEventRepository(database)
    await database.close()


def event(n: int, device: str, tenant: str = "t", time_ms: int = 0) -> TrackingEvent:
    return TrackingEvent(
        f"e{n}", tenant, device, EventType.ENTER, time_ms or 1000 + n, 52.5, 13.4, n,
        2000 + n, fence_id="depot",
    )  # fmt: skip


async def entries(client: Client, key: str) -> list[TrackingEvent]:
    found = await client.xrange(key)
    return [
        event_of_stream({k.decode(): v.decode() for k, v in fields.items()})
        for _, fields in found
    ]


async def test_events_land_in_their_device_partition_in_order(
    streams, outbox, any_redis_url: str
) -> None:
    """Several chunks of 500, each one pipeline over every partition's node."""
    client, keys = streams
    devices = [f"van-{d}" for d in range(40)]
    sent = [event(n, devices[n % 40]) for n in range(1_200)]
    await outbox.add(sent)
    publisher = StreamPublisher(
        Connection(any_redis_url), keys.name, outbox, partitions=PARTITIONS
    )
    publisher.start()
    await publisher.close()

    landed = {key: await entries(client, key) for key in keys.keys()}
    assert await client.exists(keys.name) == 0
    assert all(landed.values())  # 40 devices reach every one of 4 partitions
    for key, events in landed.items():
        assert {keys.key_of(e.tenant, e.device) for e in events} == {key}
        for device in {e.device for e in events}:
            mine = [e.fix_seq for e in events if e.device == device]
            assert mine == [e.fix_seq for e in sent if e.device == device]
    assert sum(map(len, landed.values())) == len(sent)


def device_per_partition(tenant: str, partitions: int) -> list[str]:
    """A device id of each partition, partition 0 first."""
    found: dict[int, str] = {}
    while len(found) < partitions:
        device = f"van-{uuid.uuid4().hex[:8]}"
        found.setdefault(partition_of(tenant, device, partitions), device)
    return [found[p] for p in range(partitions)]


async def test_the_watch_feed_reads_every_partition_from_its_newest_entry(
    streams, any_redis_url: str
) -> None:
    client, keys = streams
    devices = device_per_partition("t", PARTITIONS)
    for n, device in enumerate(devices):  # before anyone watched: not delivered
        await client.xadd(keys.key_of("t", device), stream_fields(event(n, device)))
    hub = RecordingHub()
    feed = StreamWatchFeed(
        Connection(any_redis_url), keys.name, hub, partitions=PARTITIONS
    )
    feed.start()
    subscription = hub.subscribe(EventFilter("t"))
    await asyncio.wait_for(hub.following.wait(), 10)

    for n, device in enumerate(devices, start=10):
        await client.xadd(keys.key_of("t", device), stream_fields(event(n, device)))
    got: list[TrackingEvent] = []
    while len(got) < PARTITIONS:
        got += await asyncio.wait_for(subscription.queue.get(), 10)

    assert sorted(e.event_id for e in got) == ["e10", "e11", "e12", "e13"]
    assert sorted(e.event_id for e in hub.seen) == ["e10", "e11", "e12", "e13"]
    await feed.close()


async def test_erasure_walks_the_device_partition_only(
    streams, any_redis_url: str
) -> None:
    """An entry of the device left in another partition (appended under another
    partition count) is not walked; the partition's other owners stay."""
    client, keys = streams
    van, car = device_per_partition("t1", PARTITIONS)[:2]
    owners = [("t1", van), ("t1", car), ("t2", van), ("t1", van + "x")]
    for n in range(40):
        tenant, device = owners[n % 4]
        added = stream_fields(event(n, device, tenant))
        await client.xadd(keys.key_of(tenant, device), added)
    elsewhere = keys.key((partition_of("t1", van, PARTITIONS) + 1) % PARTITIONS)
    await client.xadd(elsewhere, stream_fields(event(99, van, "t1")))
    trimmer = EventStreamTrimmer(
        Connection(any_redis_url), keys.name, partitions=PARTITIONS
    )

    erased = await trimmer.erase_device("t1", van)

    left = [(e.tenant, e.device) for k in keys.keys() for e in await entries(client, k)]
    assert erased == 10
    assert left.count(("t1", van)) == 1  # the one in another partition
    assert len(left) == 40 + 1 - 10
    await trimmer.close()


async def test_retention_trims_every_partition(streams, any_redis_url: str) -> None:
    client, keys = streams
    for p, key in enumerate(keys.keys()):
        old = stream_fields(event(p, "old", time_ms=CUTOFF_MS - DAY_MS))
        recent = stream_fields(event(10 + p, "recent", time_ms=CUTOFF_MS + 1))
        late = stream_fields(event(20 + p, "late", time_ms=CUTOFF_MS - DAY_MS))
        await client.xadd(key, old, id=f"{CUTOFF_MS - 2 * DAY_MS}-{p}")
        await client.xadd(key, recent, id=f"{CUTOFF_MS + 1_000}-{p}")
        await client.xadd(key, late, id=f"{CUTOFF_MS + 2_000}-{p}")
    trimmer = EventStreamTrimmer(
        Connection(any_redis_url), keys.name, partitions=PARTITIONS
    )

    purged = await trimmer.purge_before(CUTOFF_MS)

    assert purged == 2 * PARTITIONS
    for key in keys.keys():
        assert [e.device for e in await entries(client, key)] == ["recent"]
    await trimmer.close()


@pytest.mark.slow
@pytest.mark.postgres
async def test_watch_events_on_another_server_sees_every_partition(
    any_redis_url, redis_prefix, pg_url, start_server, tmp_path
) -> None:
    """One device of each partition enters the depot on one server; the watcher
    on the other sees each ENTER, and each is on its partition's key."""
    settings = replace(
        embedded_settings(tmp_path), database_url=pg_url, redis_url=any_redis_url,
        redis_key_prefix=redis_prefix, event_stream_partitions=PARTITIONS,
        default_tenant=f"geo-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    devices = device_per_partition(settings.default_tenant, PARTITIONS)
    async with depot_watched_elsewhere(
        start_server, settings, devices, tmp_path / "b"
    ) as (_, watch, to_busy):
        raised = {(await enter_depot(to_busy, d)).event_id for d in devices}
        seen: set[str] = set()
        while len(seen) < len(raised):
            response = await asyncio.wait_for(watch.read(), 10)
            seen |= {e.event_id for e in response.events}
    assert seen == raised
    keys = EventStreams(redis_prefix + GEOFENCE_STREAM, PARTITIONS)
    client = await connect(any_redis_url)
    try:
        assert await client.exists(keys.name) == 0
        for partition, device in enumerate(devices):
            on_key = await entries(client, keys.key(partition))
            assert {e.device for e in on_key} == {device}
    finally:
        await client.aclose()
