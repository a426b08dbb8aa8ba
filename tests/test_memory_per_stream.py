"""What an open stream keeps: interceptors share one wrapped handler per method, and
a watcher a few bytes per device it was sent."""

from __future__ import annotations

import tracemalloc

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.fanout import Watcher, WatchFilter
from tracking_grpc.interceptors import ErrorInterceptor
from tracking_grpc.observability.interceptor import MetricsInterceptor


class HandlerRecorder(grpc.aio.ServerInterceptor):
    """Outermost interceptor: keeps the handler each call was given."""

    def __init__(self) -> None:
        self.handlers: list[grpc.RpcMethodHandler] = []

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        self.handlers.append(handler)
        return handler


@pytest.fixture
async def health_stub():
    recorder = HandlerRecorder()
    interceptors = [recorder, MetricsInterceptor(), ErrorInterceptor()]
    server = grpc.aio.server(interceptors=interceptors)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield health_pb2_grpc.HealthStub(channel), recorder
    await server.stop(None)


async def test_calls_of_one_method_share_the_wrapped_handler(health_stub):
    stub, recorder = health_stub
    await stub.Check(health_pb2.HealthCheckRequest())
    await stub.Check(health_pb2.HealthCheckRequest())
    watch = stub.Watch(health_pb2.HealthCheckRequest())
    await watch.read()
    watch.cancel()
    check_1, check_2, watch_handler = recorder.handlers
    assert check_1 is check_2
    assert watch_handler is not check_1
    assert watch_handler.response_streaming


async def test_shared_handlers_still_map_errors(health_stub):
    stub, _ = health_stub
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_whole_tenant_watcher_keeps_little_per_device_it_was_sent():
    devices = np.array([f"veh-{i:06d}" for i in range(24_000)], dtype=object)
    snapshot = FixBatch.from_columns(
        "mem", devices, np.ones(24_000), 1_750_000_000_000 + np.arange(24_000),
        np.full(24_000, 50.0), np.full(24_000, 8.0),
    )  # fmt: skip
    first = Watcher("mem", WatchFilter())
    first.mark_sent(snapshot)  # numbers the tenant's devices, for every watcher
    tracemalloc.start()
    try:
        second = Watcher("mem", WatchFilter())
        second.mark_sent(snapshot)
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 24_000 * 40  # 16 bytes a device (a dict of tuples took 130)
