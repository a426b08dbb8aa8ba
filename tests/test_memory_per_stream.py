"""What an open stream keeps: interceptor handlers shared per method, heap released."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from tracking_grpc.core import heap
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


def _resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not heap.can_release(), reason="needs glibc's malloc_trim")
def test_freed_heap_memory_is_handed_back():
    blocks = [np.ones(2_000, np.uint8) for _ in range(50_000)]  # ~100 MB of heap
    keeper = np.ones(2_000, np.uint8)  # allocated last: the heap cannot shrink
    del blocks
    before_mb = _resident_mb()
    heap.release_free_memory()
    assert before_mb - _resident_mb() > 50
    assert keeper.sum() == 2_000
