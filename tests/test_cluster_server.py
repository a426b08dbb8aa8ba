"""Two servers on a Redis Cluster (three masters on loopback ports, started by the
test session) and PostgreSQL: live positions, the sharded fan-out and Nearby work
across them."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from urllib.parse import urlsplit

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from tracking.v1 import (
    common_pb2,
    event_pb2,
    geofence_pb2,
    track_pb2,
    track_pb2_grpc,
)

from tests.geofence.support import depot_watched_elsewhere, enter_depot
from tests.server_fixtures import batch, embedded_settings, fix, hello, now_ms

pytestmark = pytest.mark.slow


async def test_watcher_on_one_server_sees_a_device_on_another(
    redis_cluster, redis_prefix, pg_url, start_server, tmp_path
) -> None:
    settings = replace(
        embedded_settings(tmp_path), database_url=pg_url, redis_url=redis_cluster[1],
        redis_key_prefix=redis_prefix,
    )  # fmt: skip
    first = await start_server(settings=settings)
    second = await start_server(
        settings=replace(settings, data_dir=str(tmp_path / "b"))
    )
    device, t0 = f"pilot-{uuid.uuid4().hex[:8]}", now_ms() - 60_000
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as to_first,
        grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as to_second,
    ):
        watching = track_pb2_grpc.TrackSessionStub(to_second)
        watch = watching.Watch(track_pb2.WatchRequest(device_ids=[device]))
        assert (await watch.read()).snapshot_done
        call = track_pb2_grpc.TrackSessionStub(to_first).Track()
        await call.write(hello(device))
        await call.read()
        await call.write(
            batch([fix(1, 59.33, 18.06, t0), fix(2, 59.34, 18.07, t0 + 9)])
        )
        assert (await call.read()).ack.acked_seq == 2
        update = await asyncio.wait_for(watch.read(), 10)
        assert [p.seq for p in update.positions] == [2]
        centre = common_pb2.LatLng(lat=59.34, lon=18.07)
        near = await watching.Nearby(
            track_pb2.NearbyRequest(center=centre, radius_m=500)
        )
        assert [d.position.device_id for d in near.devices] == [device]
        watch.cancel()
        await call.done_writing()


def node_without(key: str, urls: list[str]) -> str:
    """The URL of a cluster node that does not hold ``key``'s slot."""
    cluster = redis.RedisCluster.from_url(urls[0])
    try:
        owner = cluster.get_node_from_key(key).port
    finally:
        cluster.close()
    return next(url for url in urls if urlsplit(url).port != owner)


async def test_geofence_event_reaches_stream_watcher_and_list_on_a_cluster(
    redis_cluster, redis_prefix, pg_url, start_server, tmp_path
) -> None:
    """Both servers are given a node that does not hold the event stream's slot."""
    stream = redis_prefix + "geofence-events"
    settings = replace(
        embedded_settings(tmp_path), database_url=pg_url,
        redis_url=node_without(stream, redis_cluster), redis_key_prefix=redis_prefix,
        default_tenant=f"geo-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    device = f"van-{uuid.uuid4().hex[:8]}"
    async with depot_watched_elsewhere(
        start_server, settings, [device], tmp_path / "b"
    ) as (fences, watch, to_busy):
        raised = await enter_depot(to_busy, device)
        assert raised.type == event_pb2.EVENT_TYPE_ENTER
        seen = (await asyncio.wait_for(watch.read(), 10)).events
        listed = await fences.ListEvents(
            geofence_pb2.ListEventsRequest(
                start_ms=now_ms() - 3_600_000, device_id=device
            )
        )
    cluster = aioredis.RedisCluster.from_url(redis_cluster[0], decode_responses=True)
    try:
        entries = await cluster.xrange(stream)
    finally:
        await cluster.aclose()
    fenced = [f["event_id"] for _, f in entries if f["fence_id"]]
    assert fenced == [raised.event_id]  # with the device's activity events
    assert [e.event_id for e in seen] == [raised.event_id]
    assert [e.event_id for e in listed.events] == [raised.event_id]
