"""Geofence events on a Redis Stream, read with a consumer group (real Redis)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tests.conftest import require_service
from tracking_grpc.events import EventType, TrackingEvent
from tracking_grpc.geofence.delivery import StreamPublisher, event_of_stream

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
        2000,
        fence_id="depot",
        attributes={"accuracy_m": "5"},
    )


async def read_group(client: aioredis.Redis, key: str, count: int) -> list:
    await client.xgroup_create(key, "consumers", id="0", mkstream=True)
    found = await client.xreadgroup("consumers", "c1", {key: ">"}, count=count)
    return found[0][1] if found else []


async def test_events_reach_a_consumer_group(stream) -> None:
    client, key = stream
    publisher = StreamPublisher(aioredis.Redis.from_url(REDIS_URL), key)
    publisher.start()
    await publisher([event(1), event(2)])
    await publisher.close()
    entries = await read_group(client, key, 10)
    assert [event_of_stream(fields) for _, fields in entries] == [event(1), event(2)]
    assert await client.xack(key, "consumers", *[i for i, _ in entries]) == 2


async def test_events_wait_while_redis_is_unreachable(stream) -> None:
    client, key = stream
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    publisher = StreamPublisher(dead, key)
    publisher.start()
    await publisher([event(3)])
    await asyncio.sleep(0.3)
    assert await client.xlen(key) == 0
    publisher.client = aioredis.Redis.from_url(REDIS_URL)  # Redis is back
    await publisher.close()
    await dead.aclose()
    entries = await read_group(client, key, 10)
    assert [fields["event_id"] for _, fields in entries] == ["e3"]
