"""Commits close together share one live write to Redis (``live_writer``).

On the real Redis live store and broker: each caller returns only once its fixes
are live, the writes of commits that arrive within ``live_write_interval_ms`` go as
one, devices end at their newest position whatever commit carried it, and a
watcher of this process is offered each commit's fixes before the write, and a
read of positions in this process sees every fix it acked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc

from tests.backends import require_service
from tests.server_fixtures import fix, track_session
from tests.services import RedisServer
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.live_writer import LiveWriter
from tracking_grpc.storage.redis_broker import RedisBroker
from tracking_grpc.storage.redis_live import RedisLiveStore

pytestmark = pytest.mark.redis

TENANT = "writer"


def commit(seq: int, devices: list[str], lat: float) -> FixBatch:
    n = len(devices)
    return FixBatch.from_columns(
        TENANT,
        np.array(devices, dtype=object),
        np.full(n, seq, dtype=np.uint64),
        np.full(n, 1_700_000_000_000 + seq * 1_000, dtype=np.int64),
        np.full(n, lat),
        np.linspace(-0.2, 0.2, n),
        received_ms=1_700_000_000_000 + seq * 1_000,
    )


class CountedLive(RedisLiveStore):
    """The real store, counting its writes."""

    writes: list[int]

    async def update(self, batch: FixBatch) -> FixBatch:
        self.writes.append(len(batch))
        return await super().update(batch)


class Watchers:
    """This process's watchers as the writer sees them: what was offered early."""

    def __init__(self) -> None:
        self.offered: list[int] = []

    def offer_early(self, updates: FixBatch) -> int:
        self.offered.append(len(updates))
        return 0

    def added_since(self, mark: int) -> bool:
        return False


@pytest.fixture
async def stores(redis_url: str, redis_prefix: str) -> AsyncIterator[CountedLive]:
    live = await CountedLive.open(redis_url, redis_prefix)
    live.writes = []
    broker = await RedisBroker.open(redis_url, redis_prefix)
    live.broker = broker  # type: ignore[attr-defined]
    try:
        yield live
    finally:
        await asyncio.gather(live.close(), broker.close())


async def test_commits_within_the_interval_share_one_write(stores) -> None:
    live = stores
    writer = LiveWriter(live, live.broker, interval_s=0.2)
    watchers = Watchers()
    writer.early_watchers = watchers
    devices = [f"van-{i}" for i in range(6)]
    # The first write goes at once; the five commits queued behind it share the
    # next one.
    await writer.add(commit(1, devices, 51.0))
    assert live.writes == [6]
    written = [
        writer.add(commit(seq, devices[:4], 51.0 + seq / 100)) for seq in range(2, 7)
    ]
    assert not any(w.done() for w in written)  # not live yet
    assert watchers.offered == [6, 4, 4, 4, 4, 4]  # offered before any write
    await asyncio.gather(*written)
    assert live.writes == [6, 20]  # one write for five commits
    newest = await live.get(TENANT, devices)
    by_device = dict(zip(newest.device.tolist(), newest.seq.tolist(), strict=True))
    assert by_device == {d: 6 if d in devices[:4] else 1 for d in devices}
    await writer.close()


async def test_without_an_interval_each_commit_is_written_at_once(stores) -> None:
    live = stores
    writer = LiveWriter(live, live.broker, interval_s=0.0)
    for seq in range(1, 4):
        await writer.add(commit(seq, ["a", "b"], 52.0))
    assert live.writes == [2, 2, 2]
    newest = await live.get(TENANT, ["a", "b"])
    assert newest.seq.tolist() == [3, 3]
    await writer.close()


async def test_a_reader_of_the_tenant_has_its_write_go_at_once(stores) -> None:
    """settled() cuts the pause short for a tenant with fixes pending, and does
    not wait at all for a tenant without."""
    live = stores
    writer = LiveWriter(live, live.broker, interval_s=3600.0)
    await writer.add(commit(1, ["a"], 53.0))
    writer.add(commit(2, ["a"], 53.1))
    other = asyncio.create_task(writer.settled("another tenant"))
    await asyncio.sleep(0)
    assert other.done()
    await asyncio.wait_for(writer.settled(TENANT), 30)  # not the hour's pause
    assert live.writes == [1, 1]
    assert (await live.get(TENANT, ["a"])).seq.tolist() == [2]
    await writer.close()


async def test_an_empty_commit_waits_for_no_write(stores) -> None:
    live = stores
    writer = LiveWriter(live, live.broker, interval_s=3600.0)
    assert writer.add(commit(1, [], 56.0)).done()
    assert live.writes == []
    await writer.close()


async def test_closing_lets_every_waiter_go(stores) -> None:
    live = stores
    writer = LiveWriter(live, live.broker, interval_s=3600.0)
    await writer.add(commit(1, ["a"], 54.0))
    waiting = writer.add(commit(2, ["a"], 54.1))
    await writer.close()
    assert waiting.done()


async def test_a_position_acked_here_is_read_here_at_once(
    start_server, redis_url: str, redis_prefix: str
) -> None:
    """A read of live positions waits for the write under way: with a long
    interval the second fix is still pending when its ack arrives."""
    server = await start_server(
        redis_url=redis_url, redis_key_prefix=redis_prefix, live_write_interval_ms=500
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        for seq, lat in ((1, 60.1), (2, 60.2)):
            await track_session(stub, "bus-7", [[fix(seq, lat, 24.9)]])
            last = await stub.GetLastPositions(
                track_pb2.GetLastPositionsRequest(device_ids=["bus-7"])
            )
            assert [p.seq for p in last.positions] == [seq]
            near = await stub.Nearby(
                track_pb2.NearbyRequest(
                    center=common_pb2.LatLng(lat=lat, lon=24.9), radius_m=100.0
                )
            )
            assert [d.position.seq for d in near.devices] == [seq]


async def test_a_redis_that_lost_its_scripts_gets_them_again(tmp_path) -> None:
    """A restarted or failed-over Redis has no scripts: the live store loads them
    and the update goes through (a Redis of this test's own: SCRIPT FLUSH would
    empty a shared one for everyone)."""
    try:
        server = RedisServer(tmp_path)
    except FileNotFoundError as exc:
        require_service("redis-server", str(exc))
    server.start()
    try:
        live = await RedisLiveStore.open(server.url, "scripts:")
        try:
            await live.update(commit(1, ["a", "b"], 55.0))
            assert server.command("SCRIPT", "FLUSH").strip() == "OK"
            await live.update(commit(2, ["a", "b"], 55.1))
            assert (await live.get(TENANT, ["a", "b"])).seq.tolist() == [2, 2]
        finally:
            await live.close()
    finally:
        server.stop()
