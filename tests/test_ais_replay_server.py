"""The AIS hour replayed through a server on the production backends: 295 vessels on
295 concurrent Track streams; a second server sharing the backends answers from the
same live state. Counts are exact, and a second replay stores nothing."""

from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest
from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc

from tests.backends import unique_tenant
from tests.conftest import TRACES, require_shared
from tests.server_fixtures import embedded_settings
from tracking_grpc.client.replay import ReplayOptions, replay_trace
from tracking_grpc.client.schedule import Pace
from tracking_grpc.core.geodesy import haversine_m
from tracking_grpc.traces import read_trace

AIS = TRACES / "nyharbor_ais_2020-06-30_first_hour.csv"
FIXES, VESSELS, REPEATED_TIMES = 8_689, 295, 2
FAST = ReplayOptions(pace=Pace(fast=True))


@pytest.mark.slow
async def test_ais_hour_through_two_servers(
    start_server, tmp_path, pg_url, redis_url, redis_prefix
):
    trace = read_trace(require_shared(AIS))
    settings = replace(
        embedded_settings(tmp_path), database_url=pg_url, redis_url=redis_url,
        redis_key_prefix=redis_prefix, default_tenant=unique_tenant(),
    )  # fmt: skip
    ingest, query = (
        await start_server(settings=settings),
        await start_server(
            settings=replace(settings, data_dir=str(tmp_path / "second"))
        ),
    )
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{ingest.port}") as to_ingest,
        grpc.aio.insecure_channel(f"127.0.0.1:{query.port}") as to_query,
    ):
        first = await replay_trace(
            track_pb2_grpc.TrackSessionStub(to_ingest), trace, FAST
        )
        again = await replay_trace(
            track_pb2_grpc.TrackSessionStub(to_query), trace, FAST
        )
        stub = track_pb2_grpc.TrackSessionStub(to_query)
        devices = sorted(set(trace.device.astype(str)))
        last = await stub.GetLastPositions(
            track_pb2.GetLastPositionsRequest(device_ids=devices)
        )
        centre = common_pb2.LatLng(lat=40.70, lon=-74.02)
        near = await stub.Nearby(
            track_pb2.NearbyRequest(center=centre, radius_m=3000, limit=1000)
        )

    assert not first.failed() and not again.failed()
    assert (first.total("stored"), first.total("duplicates")) == (
        FIXES - REPEATED_TIMES,
        REPEATED_TIMES,
    )
    assert (again.total("stored"), again.total("duplicates")) == (0, FIXES)
    assert (
        await ingest.app.history.count(settings.default_tenant)
        == FIXES - REPEATED_TIMES
    )
    assert len(last.positions) == VESSELS and not last.missing_device_ids
    newest = {p.device_id: p.time_ms - first.offset_ms for p in last.positions}
    expected = {d: int(trace.time_ms[trace.device == d].max()) for d in devices}
    assert newest == expected
    lat = np.array([p.lat for p in last.positions])
    lon = np.array([p.lon for p in last.positions])
    inside = haversine_m(40.70, -74.02, lat, lon) <= 3000
    assert inside.sum() >= 5
    assert sorted(d.position.device_id for d in near.devices) == sorted(
        np.array([p.device_id for p in last.positions])[inside]
    )
