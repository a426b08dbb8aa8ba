"""A grpc.aio server interceptor that counts and times every RPC, and names it in logs.

For each call it records the start, the status code it ended with, its duration
(unary) or how long it stayed open (streaming), and the number of open streams. It
sets the ``rpc`` field of every log line written while the call runs, and writes one
access line at debug (or warning for server-side failures).

Streaming handlers must be async generators (``yield`` responses), which is also
what OpenTelemetry's aio interceptor expects.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from tracking_grpc.config import Settings
from tracking_grpc.observability import logs, metrics, tracing

log = logging.getLogger(__name__)

SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNAVAILABLE,
    }
)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Calls, status codes, latency and open streams per RPC method.

    A method's wrapped handler is built once and reused while the handler it wraps
    stays the same, so an open stream holds no closures of its own.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]]
        self._wrapped = {}

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap_handler(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> Any:
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, method),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream, method),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(handler.stream_unary, method, streaming=True),
            handler.request_deserializer,
            handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        _wrap_unary(handler.unary_unary, method, streaming=False),
        handler.request_deserializer,
        handler.response_serializer,
    )


def _wrap_unary(behavior: Any, method: str, streaming: bool) -> Any:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = _begin(method, streaming)
        code = grpc.StatusCode.OK
        try:
            return await behavior(request, context)
        except BaseException as exc:
            code = _status_of(exc, context)
            raise
        finally:
            _end(method, started, _final_code(code, context), streaming)

    return unary


def _wrap_stream(behavior: Any, method: str) -> Any:
    if not inspect.isasyncgenfunction(behavior):
        return _wrap_unary(behavior, method, streaming=True)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
        started = _begin(method, streaming=True)
        code = grpc.StatusCode.OK
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            code = _status_of(exc, context)
            raise
        finally:
            _end(method, started, _final_code(code, context), streaming=True)

    return stream


def _begin(method: str, streaming: bool) -> float:
    logs.bind(rpc=method)
    metrics.rpc_started(method)
    if streaming:
        metrics.stream_opened(method)
    return time.perf_counter()


def _end(method: str, started: float, code: grpc.StatusCode, streaming: bool) -> None:
    seconds = time.perf_counter() - started
    metrics.rpc_handled(method, code.name, seconds, streaming)
    if streaming:
        metrics.stream_closed(method)
    level = logging.WARNING if code in SERVER_FAULTS else logging.DEBUG
    if log.isEnabledFor(level):
        log.log(
            level,
            "%s finished %s",
            method,
            code.name,
            extra={"latency_ms": round(seconds * 1000.0, 3)},
        )


def _status_of(
    exc: BaseException, context: grpc.aio.ServicerContext
) -> grpc.StatusCode:
    """The status an exception ends the call with (before or after error mapping)."""
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # The call ended under the handler: the client cancelled, its deadline
        # passed or it went away. A stream parked at a yield (its response being
        # written) is closed by grpc with GeneratorExit instead of CancelledError.
        return grpc.StatusCode.CANCELLED
    set_code = _context_code(context)
    if set_code is not None and set_code != grpc.StatusCode.OK:
        return set_code
    return grpc.StatusCode.UNKNOWN


def _final_code(
    code: grpc.StatusCode, context: grpc.aio.ServicerContext
) -> grpc.StatusCode:
    if code != grpc.StatusCode.OK:
        return code
    return _context_code(context) or code


def _context_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    code = context.code()
    if isinstance(code, int):  # grpc.aio reports the cygrpc integer status
        return _BY_VALUE.get(code)
    return code if isinstance(code, grpc.StatusCode) else None


_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


def server_interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """Interceptors to install, outermost first: tracing, then metrics and logs."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    tracing_interceptor = tracing.server_interceptor()
    if tracing_interceptor is not None:
        interceptors.append(tracing_interceptor)
    interceptors.append(MetricsInterceptor())
    return interceptors
