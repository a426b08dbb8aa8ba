"""Redis specifics beyond the contract: fan-out between processes' brokers, key
spread over a cluster's nodes, concurrent live writers, and repairs."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import redis

from tests.backends import unique_tenant
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import Unavailable
from tracking_grpc.interest import TenantInterest
from tracking_grpc.storage import redis_keys as keys
from tracking_grpc.storage.live_repair import rebuild_live
from tracking_grpc.storage.postgres import PostgresHistoryStore
from tracking_grpc.storage.redis_broker import RedisBroker, decode, encode
from tracking_grpc.storage.redis_live import RedisLiveStore

T0 = 1_750_000_000_000


def world_batch(tenant: str, n: int, time_s: int = 0) -> FixBatch:
    rng = np.random.default_rng(7 + time_s)  # devices move between updates
    return FixBatch.from_columns(
        tenant,
        [f"dev-{i}" for i in range(n)],
        np.arange(1, n + 1),
        np.full(n, T0 + 1000 * time_s),
        rng.uniform(-80, 80, n),
        rng.uniform(-180, 180, n),
    )


def test_broker_message_round_trips() -> None:
    batch = world_batch("t", 5)
    back = decode(encode(batch))
    assert back.tenant == "t" and back.device.tolist() == batch.device.tolist()
    np.testing.assert_array_equal(back.lat, batch.lat)


async def test_every_interested_broker_receives_the_publication(
    any_redis_url, redis_prefix
):
    brokers = [await RedisBroker.open(any_redis_url, redis_prefix) for _ in range(2)]
    received: list[list[FixBatch]] = [[], []]
    tenant = unique_tenant()
    wants = {tenant: TenantInterest(everything=True)}
    for broker, inbox in zip(brokers, received, strict=True):
        await broker.subscribe(lambda b, inbox=inbox: _append(inbox, b), lambda: wants)
        await broker.interest_changed()
    batch = world_batch(tenant, 40)
    await brokers[0].publish(batch)  # to itself directly, to the other by Redis
    for inbox in received:
        await _until(lambda inbox=inbox: sum(map(len, inbox)) == 40)
        devices = sorted(d for b in inbox for d in b.device)
        assert devices == sorted(batch.device)
    await asyncio.gather(*(b.close() for b in brokers))


async def test_cluster_spreads_live_keys_over_every_node(redis_cluster, redis_prefix):
    live = await RedisLiveStore.open(redis_cluster[0], redis_prefix)
    await live.update(world_batch(unique_tenant(), 300))
    for url in redis_cluster:
        node = redis.Redis.from_url(url)
        assert node.scan(0, match=redis_prefix + "geo:*", count=10_000)[1]
        assert node.scan(0, match=redis_prefix + "live:*", count=10_000)[1]
        node.close()
    await live.close()


async def test_concurrent_writers_leave_the_newest_position(
    any_redis_url, redis_prefix
):
    stores = [await RedisLiveStore.open(any_redis_url, redis_prefix) for _ in range(3)]
    tenant = unique_tenant()
    updates = [world_batch(tenant, 50, time_s=t) for t in range(30)]
    random.Random(3).shuffle(updates)
    await asyncio.gather(*(stores[i % 3].update(u) for i, u in enumerate(updates)))
    final = await stores[0].snapshot(tenant)
    assert set(final.time_ms.tolist()) == {T0 + 29_000}
    found, _ = await stores[1].nearby(tenant, final.lat[0], final.lon[0], 10.0, 5)
    assert found.device.tolist() == [final.device[0]]
    placed = await _geo_members(stores[2], redis_prefix, tenant)
    assert placed == {
        d: int(c)
        for d, c in zip(
            final.device.tolist(), keys.cell_of(final.lat, final.lon), strict=True
        )
    }
    await asyncio.gather(*(s.close() for s in stores))


async def _geo_members(
    live: RedisLiveStore, prefix: str, tenant: str
) -> dict[str, int]:
    """Each device in the GEO sets and its cell; fails if one is in two cells."""
    client = await live.redis.get()
    cells = sorted(
        int(c) for c in await client.smembers(keys.cells_key(prefix, tenant))
    )
    placed: dict[str, int] = {}
    for cell in cells:
        for device in await client.zrange(keys.geo_key(prefix, tenant, cell), 0, -1):
            assert device.decode() not in placed, f"{device!r} in two cells"
            placed[device.decode()] = cell
    return placed


async def _append(inbox: list, batch: FixBatch) -> None:
    inbox.append(batch)


async def _until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls another task's results
            await asyncio.sleep(0.01)


async def test_rebuild_mends_a_lost_geo_move(redis_url, redis_prefix, pg_url) -> None:
    history = await PostgresHistoryStore.open(pg_url)
    live = await RedisLiveStore.open(redis_url, redis_prefix)
    tenant = unique_tenant()
    fixes = FixBatch.from_rows(tenant, [("a", 1, T0, 10.5, 10.5)])
    await history.store(fixes)
    await live.update(fixes)
    cell = int(keys.cell_of(fixes.lat, fixes.lon)[0])
    client = redis.Redis.from_url(redis_url)  # the GEO step of that update "failed"
    client.delete(
        keys.geo_key(redis_prefix, tenant, cell),
        keys.geo_time_key(redis_prefix, tenant, cell),
    )
    client.close()
    assert len((await live.nearby(tenant, 10.5, 10.5, 100.0, 5))[0]) == 0
    await rebuild_live(history, live)
    assert (await live.nearby(tenant, 10.5, 10.5, 100.0, 5))[0].device.tolist() == ["a"]
    await asyncio.gather(history.close(), live.close())


async def test_rebuild_takes_a_device_out_of_a_cell_it_left(
    redis_url, redis_prefix, pg_url, monkeypatch
) -> None:
    history = await PostgresHistoryStore.open(pg_url)
    live = await RedisLiveStore.open(redis_url, redis_prefix)
    tenant = unique_tenant()
    before = FixBatch.from_rows(tenant, [("a", 1, T0, 10.5, 10.5)])
    after = FixBatch.from_rows(tenant, [("a", 2, T0 + 1000, 20.5, 20.5)])
    await history.store(FixBatch.concat([before, after]))
    await live.update(before)
    # The update into another cell places the device there; the call taking it
    # out of the cell it left times out (Redis paused, the connection dropped).
    monkeypatch.setattr(RedisLiveStore, "_move", _redis_gone)
    with pytest.raises(Unavailable):
        await live.update(after)
    monkeypatch.undo()
    assert live.needs_rebuild
    await rebuild_live(history, live)
    cell = int(keys.cell_of(after.lat, after.lon)[0])
    assert await _geo_members(live, redis_prefix, tenant) == {"a": cell}
    found, _ = await live.nearby(tenant, 10.5, 10.5, 1000.0, 5)
    assert len(found) == 0
    await asyncio.gather(history.close(), live.close())


async def _redis_gone(*args, **kwargs) -> None:
    raise Unavailable("live GEO index unavailable: Timeout reading from Redis")
