"""Events on a Redis Stream through the event-store outbox (real Redis)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tests.conftest import require_service
from tracking_grpc.events import ActivityDetail, EventType, TrackingEvent
from tracking_grpc.geofence.delivery import (
    EventStoreListener,
    StreamPublisher,
    event_of_stream,
    stream_fields,
)
from tracking_grpc.storage.redis_client import Connection
from tracking_grpc.storage.sqlite_fences import (
    SqliteEventRepository,
    SqliteGeofenceDatabase,
)

REDIS_URL = os.environ.get("TRACKING_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
pytestmark = pytest.mark.redis


@pytest.fixture
async def stream() -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """A client and a stream key of this test alone (deleted afterwards)."""
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        await client.ping()
    except RedisError as exc:
        await client.aclose()
        require_service("Redis", f"{REDIS_URL}: {exc}")
    key = f"geo-test-{uuid.uuid4().hex[:10]}:events"
    yield client, key
    await client.delete(key)
    await client.aclose()


@pytest.fixture
async def outbox(tmp_path) -> AsyncIterator[SqliteEventRepository]:
    database = await SqliteGeofenceDatabase.open(tmp_path / "geofence.sqlite3")
    yield SqliteEventRepository(database)
    await database.close()


NOT_STORED = (
    r"(?P<left>\d+) events not stored at the stop deadline"
    r"(?:, and a write of (?P<cut>\d+) more was cut off)?"
)


def event(n: int) -> TrackingEvent:
    return TrackingEvent(
        f"e{n}",
        "t",
        "dev",
        EventType.ENTER,
        1000 + n,
        52.5,
        13.4,
        n,
        2000 + n,
        fence_id="depot",
        attributes={"accuracy_m": "5"},
    )


async def read_group(client: aioredis.Redis, key: str) -> list:
    await client.xgroup_create(key, "consumers", id="0", mkstream=True)
    found = await client.xreadgroup("consumers", "c1", {key: ">"}, count=100)
    return found[0][1] if found else []


async def publish_once(url: str, key: str, outbox: SqliteEventRepository) -> None:
    """Run a publisher until it has drained the outbox (or given up), then stop."""
    publisher = StreamPublisher(Connection(url), key, outbox)
    publisher.start()
    await publisher.close()


async def test_stored_events_reach_a_consumer_group(stream, outbox) -> None:
    client, key = stream
    await outbox.add([event(1), event(2)])
    await publish_once(REDIS_URL, key, outbox)
    entries = await read_group(client, key)
    assert [event_of_stream(fields) for _, fields in entries] == [event(1), event(2)]
    assert await client.xack(key, "consumers", *[i for i, _ in entries]) == 2
    assert await outbox.unpublished(10) == []


async def test_events_stored_while_redis_is_down_go_out_later(stream, outbox) -> None:
    client, key = stream
    await outbox.add([event(3)])
    await publish_once("redis://127.0.0.1:1/0", key, outbox)  # nothing listens there
    assert await client.xlen(key) == 0
    await publish_once(REDIS_URL, key, outbox)  # Redis is back, or a restart
    entries = await read_group(client, key)
    assert [fields["event_id"] for _, fields in entries] == ["e3"]


async def test_a_stop_past_its_deadline_leaves_the_outbox_to_the_next_start(
    stream, outbox
) -> None:
    client, key = stream
    await outbox.add([event(n) for n in range(2_000)])  # four chunks of 500
    publisher = StreamPublisher(Connection(REDIS_URL), key, outbox)
    publisher.start()
    await publisher.close(deadline=asyncio.get_running_loop().time())
    published = await client.xlen(key)
    assert published < 2_000

    await publish_once(REDIS_URL, key, outbox)  # the next start
    assert await client.xlen(key) == 2_000


async def test_a_stop_past_its_deadline_logs_the_events_it_did_not_store(
    outbox, caplog
) -> None:
    store = EventStoreListener(outbox, max_queued=100_000)
    store.start()
    await store([event(n) for n in range(20_000)])  # twenty chunks of 1,000
    with caplog.at_level(logging.WARNING, "tracking_grpc.geofence.delivery"):
        await store.close(deadline=asyncio.get_running_loop().time())
    stored = len(await outbox.unpublished(20_000))
    assert stored < 20_000
    found = re.search(NOT_STORED, caplog.text)
    assert found is not None, caplog.text
    left, cut = int(found["left"]), int(found["cut"] or 0)
    assert left <= 20_000 - stored <= left + cut  # a write cut off may have stored


def test_stream_entries_carry_activity_and_route_fields() -> None:
    trip = TrackingEvent(
        "e1", "t", "van", EventType.TRIP_ENDED, 10, 48.5, 2.5, 3, 11,
        route_id="delivery-1",
        activity=ActivityDetail(motion=2, distance_m=1234.5, since_ms=3),
    )  # fmt: skip
    entry = stream_fields(trip)
    assert event_of_stream(entry) == trip
    older = {k: v for k, v in entry.items() if k not in ("route_id", "activity")}
    assert event_of_stream(older) == replace(trip, route_id="", activity=None)
