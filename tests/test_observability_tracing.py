"""Spans of a real call, captured in memory, and the log lines written inside them."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from tracking.v1 import track_pb2, track_pb2_grpc

from tests.server_fixtures import embedded_settings, fix, track_session
from tracking_grpc.config import Settings
from tracking_grpc.observability import Telemetry, logs

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
    assert spans["ingest"].parent.span_id == spans[TRACK].context.span_id


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
