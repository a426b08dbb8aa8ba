"""The History service reads through the HistoryStore: the same answers on
PostgreSQL/PostGIS as on the embedded store."""

from __future__ import annotations

import uuid

import grpc
import pytest
from tracking.v1 import history_pb2, history_pb2_grpc, track_pb2_grpc

from tests.activity.test_history_rpc import DAY_MS, T0, commute, publish


@pytest.mark.postgres
async def test_trips_stops_and_summary_on_postgres(start_server, pg_url):
    tenant = f"activity-{uuid.uuid4().hex[:8]}"
    server = await start_server(
        database_url=pg_url, max_fix_age_s=0, default_tenant=tenant
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await publish(track_pb2_grpc.TrackSessionStub(channel), commute())
        stub = history_pb2_grpc.HistoryStub(channel)
        span = dict(device_id="car", start_ms=T0, end_ms=T0 + DAY_MS)
        trips = (await stub.ListTrips(history_pb2.ListTripsRequest(**span))).trips
        stops = (await stub.ListStops(history_pb2.ListStopsRequest(**span))).stops
        days = (await stub.DailySummary(history_pb2.DailySummaryRequest(**span))).days
    assert (len(trips), len(stops)) == (1, 2)
    assert trips[0].distance_m == pytest.approx(6000, rel=0.01)
    assert sum(d.distance_m for d in days) == pytest.approx(6000, rel=0.01)
