"""Spans of a real call, captured in memory, and the log lines written inside them."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from tracking.v1 import track_pb2, track_pb2_grpc

from tests.server_fixtures import embedded_settings, fix, track_session
from tracking_grpc.config import Settings
from tracking_grpc.observability import Telemetry, logs, tracing

PUBLISH = "/tracking.v1.TrackSession/PublishBatch"
TRACK = "/tracking.v1.TrackSession/Track"


@pytest.fixture
async def traced(start_server, tmp_path):
    """A server whose spans go to an in-memory exporter, and its stub."""
    exporter = InMemorySpanExporter()
    settings = embedded_settings(tmp_path)
    server = await start_server(
        settings=settings, telemetry=Telemetry(settings, span_exporter=exporter)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield exporter, track_pb2_grpc.TrackSessionStub(channel)


def by_name(exporter: InMemorySpanExporter) -> dict:
    return {span.name: span for span in exporter.get_finished_spans()}


def publish_request() -> track_pb2.PublishBatchRequest:
    fixes = [fix(1, 41.15, -8.61), fix(2, 41.151, -8.611)]
    return track_pb2.PublishBatchRequest(
        devices=[track_pb2.DeviceFixes(device_id="taxi-7", fixes=fixes)]
    )


async def test_publish_spans_nest_and_link(traced):
    exporter, stub = traced
    await stub.PublishBatch(publish_request())
    spans = by_name(exporter)
    rpc, ingest = spans[PUBLISH], spans["ingest"]
    commit, store = spans["ingest.commit"], spans["storage.store"]
    assert rpc.kind == SpanKind.SERVER
    assert ingest.parent.span_id == rpc.context.span_id
    assert [link.context.span_id for link in commit.links] == [ingest.context.span_id]
    assert store.parent.span_id == commit.context.span_id
    assert store.attributes["fixes"] == 2


async def test_device_stream_gets_a_server_span(traced):
    exporter, stub = traced
    await track_session(stub, "bus-14", [[fix(1, 53.4, -2.9)]])
    spans = by_name(exporter)
    assert spans[TRACK].kind == SpanKind.SERVER
    # A stream's messages get no span each (thousands a second): the group commit
    # that stored them links to the stream's span instead.
    assert "ingest" not in spans
    links = [link.context.span_id for link in spans["ingest.commit"].links]
    assert links == [spans[TRACK].context.span_id]


async def test_access_log_line_carries_the_rpc_trace_id(traced):
    exporter, stub = traced
    stream, level = io.StringIO(), logging.getLogger().level
    handler = logs.configure(Settings(log_format="json", log_level="DEBUG"), stream)
    try:
        await stub.PublishBatch(publish_request())
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (access,) = [line for line in lines if line["message"] == f"{PUBLISH} finished OK"]
    rpc = by_name(exporter)[PUBLISH]
    assert access["trace_id"] == format(rpc.context.trace_id, "032x")
    assert access["rpc"] == PUBLISH and access["latency_ms"] > 0
    assert access["tenant"] == "default"


async def test_stream_log_lines_name_the_device(traced):
    _, stub = traced
    stream, level = io.StringIO(), logging.getLogger().level
    handler = logs.configure(Settings(log_format="json", log_level="DEBUG"), stream)
    try:
        await track_session(stub, "bus-14", [[fix(1, 53.4, -2.9)]])
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = next(line for line in lines if line["message"] == f"{TRACK} finished OK")
    assert (access["device"], access["tenant"]) == ("bus-14", "default")


@pytest.mark.parametrize(
    ("ratio", "exported"),
    [pytest.param(0.0, False, id="none"), pytest.param(1.0, True, id="all")],
)
async def test_sampling_ratio_decides_what_is_exported(
    start_server, tmp_path, ratio, exported
):
    exporter = InMemorySpanExporter()
    settings = embedded_settings(tmp_path, trace_sample_ratio=ratio)
    telemetry = Telemetry(settings, span_exporter=exporter)
    server = await start_server(settings=settings, telemetry=telemetry)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await track_pb2_grpc.TrackSessionStub(channel).PublishBatch(publish_request())
    assert (PUBLISH in by_name(exporter)) is exported


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on loopback that keeps the span names."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def Export(self, request, context):
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.names += [span.name for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_an_otlp_collector():
    collector, receiver = Collector(), grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    await receiver.start()
    try:
        tracing.configure(Settings(otlp_endpoint=f"http://127.0.0.1:{port}"))
        with tracing.span("storage.store", fixes=3):
            pass
        await asyncio.to_thread(tracing.shutdown)  # flushes the batch exporter
    finally:
        await receiver.stop(None)
    assert collector.names == ["storage.store"]
