"""The error interceptor on a real grpc.aio server: an unexpected exception ends
the call as INTERNAL and is logged with the method it happened in."""

from __future__ import annotations

import logging

import grpc
import pytest

from tracking_grpc.interceptors import ErrorInterceptor

METHOD = "/probe.v1.Probe/Fail"


async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("a bug")


async def test_an_unhandled_error_is_internal_and_names_its_method(caplog) -> None:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    handler = grpc.unary_unary_rpc_method_handler(fail)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("probe.v1.Probe", {"Fail": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(METHOD)
            with (
                caplog.at_level(logging.ERROR, "tracking_grpc.interceptors"),
                pytest.raises(grpc.aio.AioRpcError) as error,
            ):
                await call(b"")
    finally:
        await server.stop(None)
    assert error.value.code() == grpc.StatusCode.INTERNAL
    [record] = [r for r in caplog.records if r.name == "tracking_grpc.interceptors"]
    assert record.getMessage() == f"unhandled error in {METHOD}"
