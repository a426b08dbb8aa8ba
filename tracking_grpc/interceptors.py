"""The one place where errors become gRPC statuses.

Every handler is wrapped: a :class:`~tracking_grpc.errors.TrackingError` becomes its
status code with its message (and, for an invalid argument, a ``google.rpc.BadRequest``
field violation in the rich status details); anything else is logged and becomes
INTERNAL without leaking internals to the caller.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from tracking_grpc.errors import InvalidArgument, TrackingError

log = logging.getLogger(__name__)

DETAILS_KEY = "grpc-status-details-bin"


def _trailers(error: TrackingError) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(error, InvalidArgument):
        return ()
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=error.field, description=error.reason
    )
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    status = status_pb2.Status(
        code=error.code.value[0], message=error.message, details=[detail]
    )
    return ((DETAILS_KEY, status.SerializeToString()),)


async def abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """End the call with the status that ``error`` maps to."""
    if isinstance(error, TrackingError):
        await context.abort(error.code, error.message, _trailers(error))
    if context.done():
        # The call already ended (client gone, server stopping): a read or write on
        # it failed, which is how such calls end; there is nobody left to tell.
        log.debug("%s ended: %r", _method(context), error)
        return
    log.exception("unhandled error in %s", _method(context), exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _method(context: grpc.aio.ServicerContext) -> str:
    try:
        return str(context._rpc_event.call_details.method.decode())
    except AttributeError:
        return "rpc"


def _wrap_unary(
    behavior: Callable[..., Awaitable[Any]],
) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (grpc.aio.AbortError, AssertionError, KeyboardInterrupt):
            raise
        except Exception as exc:
            await abort(context, exc)

    return handler


def _wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def generator(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, exc)

        return generator
    return _wrap_unary(behavior)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps the service's errors to statuses for every RPC.

    The wrapped handler of a method is built once and reused while the handler it
    wraps stays the same: a handler made per call lives as long as its call, which
    for 10k open streams is 10k copies of the same closures.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]]
        self._wrapped = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap_handler(handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


_KINDS = {
    "unary_unary": (grpc.unary_unary_rpc_method_handler, _wrap_unary),
    "unary_stream": (grpc.unary_stream_rpc_method_handler, _wrap_stream),
    "stream_unary": (grpc.stream_unary_rpc_method_handler, _wrap_unary),
    "stream_stream": (grpc.stream_stream_rpc_method_handler, _wrap_stream),
}


def _wrap_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    for attribute, (make, wrap) in _KINDS.items():
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return make(
                wrap(behavior),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler
