"""Log lines: JSON with a fixed set of fields, trace ids inside spans, no secrets."""

from __future__ import annotations

import io
import json
import logging
import time
import warnings

import grpc
import jwt
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tracking.v1 import geofence_pb2, geofence_pb2_grpc, track_pb2_grpc

from tests.server_fixtures import fix, track_session
from tests.test_observability_tracing import publish_request
from tracking_grpc.config import Settings
from tracking_grpc.observability import logs, tracing

log = logging.getLogger("tracking_grpc.tests.logs")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def json_lines():
    stream = io.StringIO()
    settings = Settings(log_format="json", jwt_hs256_secret="hunter2-signing-key")
    handler = logs.configure(settings, stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logging.getLogger().removeHandler(handler)
    tracing.shutdown()


def test_json_line_has_exactly_the_fixed_fields(json_lines):
    with logs.fields(device="bus-14", tenant="t1"):
        log.info("stored %d fixes", 3, extra={"latency_ms": 1.5})
    (line,) = json_lines()
    assert tuple(line) == logs.FIELDS
    assert line["message"] == "stored 3 fixes"
    assert (line["device"], line["tenant"], line["latency_ms"]) == ("bus-14", "t1", 1.5)
    assert line["trace_id"] is None


def test_line_written_inside_a_span_carries_its_ids(json_lines):
    exporter = InMemorySpanExporter()
    tracing.configure(Settings(), exporter=exporter)
    with tracing.span("storage.flush"):
        log.warning("flush slow")
    (line,) = json_lines()
    (span,) = exporter.get_finished_spans()
    assert line["trace_id"] == format(span.context.trace_id, "032x")
    assert line["span_id"] == format(span.context.span_id, "016x")


@pytest.mark.parametrize(
    "message",
    [
        pytest.param("authorization: Bearer abc.def.ghi", id="bearer-header"),
        pytest.param("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", id="bare-jwt"),
        pytest.param("connect postgresql://app:s3cret@db/tracking", id="url-password"),
        pytest.param("secret is hunter2-signing-key", id="configured-secret"),
        pytest.param("password=s3cret&x=1", id="password-pair"),
    ],
)
def test_secrets_never_reach_the_log(json_lines, message):
    log.error(message)
    (line,) = json_lines()
    for secret in ("abc.def.ghi", "eyJhbGciOiJIUzI1NiJ9", "s3cret", "hunter2"):
        assert secret not in line["message"]
    assert logs.REDACTED in line["message"]


@pytest.mark.parametrize(
    ("setting", "stream", "expected"),
    [
        pytest.param("auto", Terminal(), "text", id="auto-on-terminal"),
        pytest.param("auto", io.StringIO(), "json", id="auto-in-a-pipe"),
        pytest.param("text", io.StringIO(), "text", id="text-forced"),
        pytest.param("json", Terminal(), "json", id="json-forced"),
    ],
)
def test_format_follows_the_setting_and_the_terminal(setting, stream, expected):
    assert logs.choose_format(setting, stream) == expected


def test_text_lines_are_readable():
    stream = Terminal()
    handler = logs.configure(Settings(log_format="auto"), stream)
    try:
        with logs.fields(rpc="/tracking.v1.TrackSession/Track"):
            log.warning("device %s resumed", "bus-14")
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    assert "WARNING" in text and "device bus-14 resumed" in text
    assert "rpc=/tracking.v1.TrackSession/Track" in text


SECRET = "observability-test-signing-key-0123456789"


async def test_server_logs_hold_no_tokens_or_secrets(start_server):
    stream, root = io.StringIO(), logging.getLogger()
    level = root.level
    settings = Settings(log_format="json", log_level="DEBUG", jwt_hs256_secret=SECRET)
    handler = logs.configure(settings, stream)
    server = await start_server(auth_mode="jwt", jwt_hs256_secret=SECRET)
    claims: dict[str, object] = {"sub": "taxi-7", "tenant": "t", "role": "device"}
    claims["exp"] = time.time() + 600  # within max_token_lifetime_s
    good = jwt.encode(claims, SECRET)
    forged = jwt.encode({**claims, "role": "admin"}, "x" * 32)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = track_pb2_grpc.TrackSessionStub(channel)
            for value in (good, forged, "not-a-jwt"):
                metadata = (("authorization", f"Bearer {value}"),)
                await stub.PublishBatch(publish_request(), metadata=metadata).code()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    text = stream.getvalue()
    assert "UNAUTHENTICATED" in text and "finished OK" in text
    for secret in (SECRET, good, forged, good.split(".")[2], "not-a-jwt"):
        assert secret not in text


async def test_ingest_writes_no_info_line_per_fix_or_message(start_server):
    stream, root = io.StringIO(), logging.getLogger()
    level = root.level
    handler = logs.configure(Settings(log_format="json", log_level="INFO"), stream)
    server = await start_server()
    started = len(stream.getvalue())
    batches = [[fix(10 * b + i, 41.15, -8.61) for i in range(1, 11)] for b in range(50)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = track_pb2_grpc.TrackSessionStub(channel)
            _, acks = await track_session(stub, "taxi-7", batches)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert sum(ack.stored for ack in acks) == 500
    during = stream.getvalue()[started:].splitlines()
    assert len(during) < 5, during  # 50 messages, 500 fixes: no line for each


def test_python_warnings_come_out_as_json_lines(json_lines, capfd):
    """A library's warning goes through the log's formatter, not raw to stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("invalid value encountered", RuntimeWarning, stacklevel=1)
    [line] = json_lines()
    assert (line["level"], line["logger"]) == ("WARNING", "py.warnings")
    assert "RuntimeWarning: invalid value encountered" in line["message"]
    assert capfd.readouterr().err == ""


async def test_a_nan_in_wkt_is_refused_and_logged_as_json_only(start_server, capfd):
    stream, root = io.StringIO(), logging.getLogger()
    level = root.level
    handler = logs.configure(Settings(log_format="json", log_level="INFO"), stream)
    server = await start_server()
    shape = geofence_pb2.FenceShape(wkt="POLYGON((0 0, nan 0, 1 1, 0 0))")
    request = geofence_pb2.CreateFenceRequest(
        fence=geofence_pb2.Fence(fence_id="nan", shape=shape)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with warnings.catch_warnings(record=True) as shown:
                warnings.simplefilter("always")
                stub = geofence_pb2_grpc.GeofenceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.CreateFence(request)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "finite" in caught.value.details()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert not [x for x in lines if x["logger"] == "py.warnings"]
    assert [str(w.message) for w in shown if w.category is RuntimeWarning] == []
    assert "Warning" not in capfd.readouterr().err
