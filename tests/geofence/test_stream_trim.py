"""Erasure and retention of the Redis Stream of geofence events, on a standalone
Redis and on a Redis Cluster: a device's entries go, old events go, the rest stay."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tracking_grpc.events import EventType, TrackingEvent
from tracking_grpc.geofence.delivery import stream_fields
from tracking_grpc.geofence.stream_trim import CHUNK, EventStreamTrimmer
from tracking_grpc.retention import DAY_MS
from tracking_grpc.storage.redis_client import Connection, connect

pytestmark = pytest.mark.redis

CUTOFF_MS = 1_700_000_000_000 // DAY_MS * DAY_MS
SKEW_MS = 600_000


def event(tenant: str, device: str, time_ms: int) -> dict:
    found = TrackingEvent(
        uuid.uuid4().hex, tenant, device, EventType.ENTER, time_ms, 52.5, 13.4, 1, 0
    )
    return stream_fields(found)


@pytest.fixture
async def stream(any_redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """A client and a stream key of this test alone (deleted afterwards)."""
    client = await connect(any_redis_url)
    key = f"trim-test-{uuid.uuid4().hex[:10]}:geofence-events"
    yield client, key
    await client.delete(key)
    await client.aclose()


async def devices(client, key: str) -> list[tuple[str, str]]:
    entries = await client.xrange(key)
    return [(f[b"tenant"].decode(), f[b"device_id"].decode()) for _, f in entries]


async def test_erasure_deletes_the_entries_of_one_device_of_one_tenant(
    stream, any_redis_url: str
) -> None:
    client, key = stream
    owners = [("t1", "van"), ("t1", "car"), ("t2", "van")]
    for n in range(2 * CHUNK + 500):  # more than one walk's chunk
        tenant, device = owners[n % 3]
        await client.xadd(key, event(tenant, device, CUTOFF_MS + n))
    trimmer = EventStreamTrimmer(Connection(any_redis_url), key)

    erased = await trimmer.erase_device("t1", "van")

    left = await devices(client, key)
    assert erased == (2 * CHUNK + 500 + 2) // 3
    assert ("t1", "van") not in left
    assert len(left) == 2 * CHUNK + 500 - erased
    assert await trimmer.erase_device("t1", "van") == 0
    await trimmer.close()


async def test_retention_deletes_events_before_the_cutoff_however_late_sent(
    stream, any_redis_url: str
) -> None:
    """Ids are the Redis clock at append: entries appended long before the cutoff
    are trimmed whole; later ones go by their fix time (a late upload appended
    after the cutoff with an old fix time goes, an event whose fix is after the
    cutoff stays even when appended just before it)."""
    client, key = stream
    appended = [
        (CUTOFF_MS - 2 * DAY_MS, "old", CUTOFF_MS - 2 * DAY_MS),
        (CUTOFF_MS - SKEW_MS // 2, "early", CUTOFF_MS + 1_000),
        (CUTOFF_MS + 5_000, "late-upload", CUTOFF_MS - DAY_MS),
        (CUTOFF_MS + 6_000, "recent", CUTOFF_MS + 6_000),
    ]
    for id_ms, device, time_ms in appended:
        await client.xadd(key, event("t", device, time_ms), id=f"{id_ms}-0")
    trimmer = EventStreamTrimmer(Connection(any_redis_url), key, SKEW_MS)

    purged = await trimmer.purge_before(CUTOFF_MS)

    assert purged == 2
    assert await devices(client, key) == [("t", "early"), ("t", "recent")]
    await trimmer.close()


async def test_trimming_a_stream_that_does_not_exist_trims_nothing(
    stream, any_redis_url: str
) -> None:
    _, key = stream
    trimmer = EventStreamTrimmer(Connection(any_redis_url), key)
    assert await trimmer.purge_before(CUTOFF_MS) == 0
    assert await trimmer.erase_device("t", "van") == 0
    await trimmer.close()
