"""Two servers on a Redis Cluster (three masters on loopback ports, started by the
test session) and PostgreSQL: live positions, the sharded fan-out and Nearby work
across them."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import grpc
import pytest
from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc

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
