"""Route notices on a real Redis: a burst of take-overs (a reconnect storm moving
many devices to one process) is announced in a few round trips, not one per
device, every device is named, and a burst larger than the stream's cap is heard
whole by a listener that had not read it yet; entries of the older form (one
device each) are heard as well."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.routes import support
from tests.routes.test_assignments import TENANT, planned
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.routing.assignments import HELD, AssignmentKeeper
from tracking_grpc.routing.monitor import RouteMonitor
from tracking_grpc.storage.redis_client import Client, Connection
from tracking_grpc.storage.redis_notices import (
    ANNOUNCE_PIECE,
    MAXLEN,
    RedisDeviceNotices,
)
from tracking_grpc.storage.sqlite import SqliteHistoryStore

pytestmark = pytest.mark.redis

DEVICES = 2 * ANNOUNCE_PIECE + 500
HANG_S = 60  # a hang guard, not a timing


def named(fields: dict[bytes, bytes]) -> list[str]:
    """The devices a stream entry names, in either form."""
    if b"devices" in fields:
        return list(json.loads(fields[b"devices"]))
    return [fields[b"device"].decode()]


def count_round_trips(client: Client) -> list[int]:
    """Count, on the real client, each command sent alone and each pipeline
    executed: one round trip each (the calls go on to Redis unchanged)."""
    trips = [0]
    command, pipeline = client.execute_command, client.pipeline

    async def counted_command(*args: Any, **kwargs: Any) -> Any:
        trips[0] += 1
        return await command(*args, **kwargs)

    def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def counted_execute(*a: Any, **k: Any) -> Any:
            trips[0] += 1
            return await execute(*a, **k)

        pipe.execute = counted_execute  # type: ignore[method-assign]
        return pipe

    client.execute_command = counted_command  # type: ignore[method-assign]
    client.pipeline = counted_pipeline  # type: ignore[method-assign,assignment]
    return trips


async def forget_nothing(tenant: str, device: str) -> dict[str, int]:
    return {}


async def test_a_burst_of_take_overs_costs_a_few_round_trips(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    store = await SqliteHistoryStore.open(tmp_path / "history.sqlite3")
    connection = Connection(redis_url)
    client = await connection.get()
    trips = count_round_trips(client)
    notices = RedisDeviceNotices(
        connection, redis_prefix, forget_nothing, stream="routes", subject="route"
    )
    devices = [f"van-{i}" for i in range(DEVICES)]
    monitor = RouteMonitor()
    for device in devices:  # assigned elsewhere: held nowhere here
        monitor.assign(planned(device))
    keeper = AssignmentKeeper(monitor, store, 3600.0)
    keeper.announce = notices.announce_many
    keeper.start()
    first_fixes = FixBatch.from_columns(
        TENANT,
        devices,
        np.ones(DEVICES, dtype=np.int64),
        np.full(DEVICES, support.START_MS),
        np.full(DEVICES, 60.16),
        np.full(DEVICES, 24.93),
        accuracy_m=np.full(DEVICES, 5.0),
    )

    await keeper.process(first_fixes)  # one commit takes every device over
    await keeper.stop()  # after the notices sent in the background

    assert trips[0] <= -(-DEVICES // ANNOUNCE_PIECE)
    entries = await client.xrange(redis_prefix + "routes")
    heard = sorted(d for _, fields in entries for d in named(fields))
    assert heard == sorted(devices)
    assert {fields[b"kind"] for _, fields in entries} == {HELD.encode()}
    await notices.close()
    await store.close()


async def test_a_burst_larger_than_the_cap_is_heard_whole(
    redis_url: str, redis_prefix: str
) -> None:
    """The listener is busy with an earlier notice while a take-over of more
    devices than the stream keeps entries is announced; it then hears them all."""
    heard: list[str] = []
    busy, go_on, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def released(tenant: str, device: str) -> dict[str, int]:
        if device == "first":
            busy.set()
            await go_on.wait()
        heard.append(device)
        if device == "older-form":
            done.set()
        return {}

    def process() -> RedisDeviceNotices:
        return RedisDeviceNotices(
            Connection(redis_url),
            redis_prefix,
            forget_nothing,
            stream="routes",
            subject="route",
            others={HELD: released},
        )

    listening, telling = process(), process()
    await listening.start()
    client = await telling.connection.get()
    stream = redis_prefix + "routes"
    devices = [f"van-{i}" for i in range(MAXLEN + 2 * ANNOUNCE_PIECE)]
    try:
        await telling.announce(TENANT, "first", HELD)
        async with asyncio.timeout(HANG_S):
            await busy.wait()
            await telling.announce_many(TENANT, devices, HELD)
            await client.xadd(
                stream,
                {
                    "process": "old",
                    "tenant": TENANT,
                    "device": "older-form",
                    "kind": HELD,
                },
            )
            go_on.set()
            await done.wait()  # the last entry: read after all the others
    finally:
        await listening.close()
        await telling.close()

    assert heard == ["first", *devices, "older-form"]
