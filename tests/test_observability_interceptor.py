"""The RPC interceptor on a real grpc.aio server: calls, codes, open streams, probe."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from tracking.v1 import track_pb2, track_pb2_grpc

from tests.prometheus_server import PrometheusServer
from tests.server_fixtures import fix, now_ms
from tracking_grpc.config import Settings
from tracking_grpc.observability import metrics, probe
from tracking_grpc.observability.interceptor import server_interceptors

CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"


@pytest.fixture
async def health_server():
    registry = metrics.enable()
    server = grpc.aio.server(interceptors=server_interceptors(Settings()))
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield health_pb2_grpc.HealthStub(channel), registry, port
    await server.stop(None)
    metrics.disable()


async def test_calls_are_counted_by_status_code(health_server):
    stub, registry, _ = health_server
    await stub.Check(health_pb2.HealthCheckRequest())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    handled = registry.get_sample_value
    not_found = {"method": CHECK, "code": "NOT_FOUND"}
    assert handled("tracking_rpc_handled_total", {"method": CHECK, "code": "OK"}) == 1
    assert (
        await eventually(lambda: handled("tracking_rpc_handled_total", not_found)) == 1
    )
    assert handled("tracking_rpc_duration_seconds_count", {"method": CHECK}) == 2


async def test_open_streams_go_up_and_down(health_server):
    stub, registry, _ = health_server
    call = stub.Watch(health_pb2.HealthCheckRequest())
    await call.read()
    assert registry.get_sample_value("tracking_streams_open", {"method": WATCH}) == 1
    call.cancel()
    for _ in range(100):
        if registry.get_sample_value("tracking_streams_open", {"method": WATCH}) == 0:
            break
        await asyncio.sleep(0.01)
    assert registry.get_sample_value("tracking_streams_open", {"method": WATCH}) == 0
    code = {"method": WATCH, "code": "CANCELLED"}
    assert registry.get_sample_value("tracking_rpc_handled_total", code) == 1


async def test_probe_reports_serving(health_server):
    _, _, port = health_server
    status = await asyncio.to_thread(probe.check, f"127.0.0.1:{port}")
    assert status == "SERVING"


def test_probe_fails_on_a_closed_port():
    assert probe.main(["--addr", "127.0.0.1:1", "--timeout-s", "0.5"]) == 1


async def test_prometheus_scrapes_the_rpc_counters(health_server, tmp_path):
    stub, _, _ = health_server
    http, _ = metrics.serve("127.0.0.1:0")
    target = f"127.0.0.1:{http.server_port}"
    try:
        with PrometheusServer(tmp_path, [target]) as prometheus:
            for _ in range(5):
                await stub.Check(health_pb2.HealthCheckRequest())
            query = f'sum(tracking_rpc_handled_total{{method="{CHECK}",code="OK"}})'
            seen = await asyncio.to_thread(prometheus.wait_for, query, 5.0)
    finally:
        http.shutdown()
        http.server_close()
    assert seen == 5.0


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        pytest.param(track_pb2.PublishBatchRequest(), "INVALID_ARGUMENT", id="empty"),
        pytest.param(
            track_pb2.PublishBatchRequest(
                devices=[track_pb2.DeviceFixes(device_id="d", fixes=[fix(1, 1, 1)])]
            ),
            "OK",
            id="one-fix",
        ),
    ],
)
async def test_mapped_errors_are_counted_by_their_code(start_server, request_, code):
    server = await start_server(metrics_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = track_pb2_grpc.TrackSessionStub(channel).PublishBatch(request_)
        assert (await call.code()).name == code
    labels = {"method": "/tracking.v1.TrackSession/PublishBatch", "code": code}
    # An abort sends the status before the handler unwinds: the count may lag.
    handled = await eventually(
        lambda: metrics.registry().get_sample_value(
            "tracking_rpc_handled_total", labels
        )
    )
    assert handled == 1


async def eventually(read, timeout_s: float = 2.0):
    """The first non-None value ``read`` returns within ``timeout_s``."""
    for _ in range(int(timeout_s / 0.01)):
        if (value := read()) is not None:
            return value
        await asyncio.sleep(0.01)
    return read()


async def test_a_watch_left_while_its_snapshot_is_written_counts_as_cancelled(
    start_server,
):
    server = await start_server(metrics_listen="127.0.0.1:0")
    address = f"127.0.0.1:{server.port}"
    devices = [f"d{i}" for i in range(5_000)]
    columns = track_pb2.ColumnarFixes(
        device_ids=devices,
        device_index=range(len(devices)),
        seq=[1] * len(devices),
        time_ms=[now_ms()] * len(devices),
        lat=[60.0 + i * 1e-4 for i in range(len(devices))],
        lon=[25.0] * len(devices),
    )
    # Without BDP probing the client's window stays 64 KiB: the server's write of
    # the second snapshot chunk waits, its generator parked at the yield.
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        await stub.PublishBatch(track_pb2.PublishBatchRequest(columns=columns))
        call = stub.Watch(track_pb2.WatchRequest())
        assert (await call.read()).snapshot
        await asyncio.sleep(0.5)
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED

    def handled(code: str) -> float | None:
        labels = {"method": "/tracking.v1.TrackSession/Watch", "code": code}
        return metrics.registry().get_sample_value("tracking_rpc_handled_total", labels)

    # The handler unwinds after the client has its status: the count may lag.
    assert await eventually(lambda: handled("CANCELLED") or handled("UNKNOWN")) == 1
    assert handled("CANCELLED") == 1 and handled("UNKNOWN") is None
