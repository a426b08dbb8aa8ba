"""Geofence evaluation gets a span linked to the group commit that stored the fixes."""

from __future__ import annotations

import asyncio
import json

import grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tracking.v1 import geofence_pb2, geofence_pb2_grpc, track_pb2, track_pb2_grpc

from tests.server_fixtures import embedded_settings, fix
from tracking_grpc.observability import Telemetry, metrics

SQUARE = {
    "type": "Polygon",
    "coordinates": [[[2, 48], [3, 48], [3, 49], [2, 49], [2, 48]]],
}


async def test_fence_entry_is_traced_and_counted(start_server, tmp_path):
    exporter = InMemorySpanExporter()
    settings = embedded_settings(tmp_path, metrics_listen="127.0.0.1:0")
    telemetry = Telemetry(settings, span_exporter=exporter)
    server = await start_server(settings=settings, telemetry=telemetry)
    shape = geofence_pb2.FenceShape(geojson=json.dumps(SQUARE))
    fence = geofence_pb2.Fence(fence_id="depot", shape=shape)
    fixes = [fix(1, 47.9, 2.5), fix(2, 48.5, 2.5)]  # outside, then inside
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await geofence_pb2_grpc.GeofenceStub(channel).CreateFence(
            geofence_pb2.CreateFenceRequest(fence=fence)
        )
        await track_pb2_grpc.TrackSessionStub(channel).PublishBatch(
            track_pb2.PublishBatchRequest(
                devices=[track_pb2.DeviceFixes(device_id="van-1", fixes=fixes)]
            )
        )
        for _ in range(200):  # processors run after the ack, off the commit path
            if metrics.registry().get_sample_value(
                "tracking_events_total", {"type": "enter"}
            ):
                break
            await asyncio.sleep(0.01)
    spans = exporter.get_finished_spans()
    commit = next(s for s in spans if s.name == "ingest.commit")
    geofence = next(s for s in spans if s.name == "process.geofence")
    assert [link.context.span_id for link in geofence.links] == [commit.context.span_id]
    enter = metrics.registry().get_sample_value(
        "tracking_events_total", {"type": "enter"}
    )
    assert enter == 1
