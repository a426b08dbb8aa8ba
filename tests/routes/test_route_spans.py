"""A Route call's OSRM work shows up as a child span of the call's server span."""

from __future__ import annotations

import grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tracking.v1 import common_pb2, route_pb2, route_pb2_grpc

from tests.server_fixtures import embedded_settings
from tracking_grpc.observability import Telemetry

P = common_pb2.LatLng


async def test_route_call_has_a_routing_span(start_server, helsinki_dir, tmp_path):
    exporter = InMemorySpanExporter()
    settings = embedded_settings(tmp_path, routing_data_dir=str(helsinki_dir))
    telemetry = Telemetry(settings, span_exporter=exporter)
    server = await start_server(settings=settings, telemetry=telemetry)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await route_pb2_grpc.RouteStub(channel).ComputeRoute(
            route_pb2.ComputeRouteRequest(
                origin=P(lat=60.1702, lon=24.9401),
                destination=P(lat=60.1750, lon=24.9502),
            )
        )
    spans = {span.name: span for span in exporter.get_finished_spans()}
    call, osrm = spans["/tracking.v1.Route/ComputeRoute"], spans["routing.route"]
    assert osrm.parent.span_id == call.context.span_id
    assert osrm.attributes["profile"] == "car"
