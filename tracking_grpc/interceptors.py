"""The one place where errors become gRPC statuses.

Every handler is wrapped: a :class:`~tracking_grpc.errors.TrackingError` becomes its
status code with its message (and, for an invalid argument, a ``google.rpc.BadRequest``
field violation in the rich status details; for a call refused while storage is
behind, a ``google.rpc.RetryInfo``); anything else is logged and becomes
INTERNAL without leaking internals to the caller. A request whose bytes do not decode
is an invalid argument too (see :func:`_decoder`).

A call whose client went away (a write or read on it failed in gRPC's core) ends as
CANCELLED, quietly: there is nobody to tell, and it is not a server fault. A status
waits behind the responses the client has not read; the handler does not wait for it
(see :mod:`tracking_grpc.streams`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc._cython.cygrpc import ExecuteBatchError  # no public name in grpc.aio

from tracking_grpc.errors import Congested, InvalidArgument, TrackingError

log = logging.getLogger(__name__)

DETAILS_KEY = "grpc-status-details-bin"
# How long ending a call waits for its status to be taken: it waits longer only
# behind responses the client does not read, and then it goes out if it ever reads.
STATUS_WAIT_S = 1.0


def _trailers(error: TrackingError) -> tuple[tuple[str, bytes], ...]:
    """The rich status details a client can act on: the field of an invalid
    argument, the wait before retrying a call refused for congestion."""
    detail = any_pb2.Any()
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.reason
        )
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    elif isinstance(error, Congested):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(round(error.retry_after_s * 1000))
        detail.Pack(retry)
    else:
        return ()
    status = status_pb2.Status(
        code=error.code.value[0], message=error.message, details=[detail]
    )
    return ((DETAILS_KEY, status.SerializeToString()),)


async def abort(
    context: grpc.aio.ServicerContext, error: Exception, method: str = "rpc"
) -> None:
    """End the call of ``method`` with the status that ``error`` maps to."""
    if isinstance(error, ExecuteBatchError):
        # A read or write failed in gRPC's core: the client went away (or the
        # server is stopping). That is how such calls end; nobody is left to tell.
        log.debug("%s: the call ended under it", method)
        raise asyncio.CancelledError from error
    if isinstance(error, TrackingError):
        await _end(context, method, error.code, error.message, _trailers(error))
        return
    if context.done():
        # The call already ended (client gone, server stopping).
        log.debug("%s ended: %r", method, error)
        return
    log.exception("unhandled error in %s", method, exc_info=error)
    await _end(context, method, grpc.StatusCode.INTERNAL, "internal error")


async def _end(
    context: grpc.aio.ServicerContext,
    method: str,
    code: grpc.StatusCode,
    message: str,
    trailers: tuple[tuple[str, bytes], ...] = (),
) -> None:
    """Abort with a status, waiting at most STATUS_WAIT_S for it to be taken.

    gRPC sends a status after the responses written before it: to a client that
    does not read them it stays queued, and the handler (with all it holds) would
    wait as long. Given up, it is still queued; gRPC ends the call as aborted. A
    client that goes away meanwhile fails it: nobody is left to tell.
    """
    try:
        async with asyncio.timeout(STATUS_WAIT_S):
            await context.abort(code, message, trailers)
    except TimeoutError:
        log.debug("%s: its %s waits behind unread responses", method, code)
    except ExecuteBatchError:
        log.debug("%s: the call ended before its %s", method, code)


class _Undecodable:
    """A unary request whose bytes did not decode, as the wrapped handler gets it."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise request.error
    return request


def _message_type(deserializer: Callable[[bytes], Any]) -> str:
    """The full name of the message that ``deserializer`` (``FromString``) makes."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


def _decoder(
    deserializer: Callable[[bytes], Any] | None, request_streaming: bool
) -> Callable[[bytes], Any] | None:
    """``deserializer`` with a DecodeError turned into an InvalidArgument.

    A stream's requests are decoded as its handler reads them, in the handler's
    task: the error is raised there and mapped like any other. grpc decodes a
    unary request before the handler runs, where an exception becomes UNKNOWN and
    an ERROR traceback: the request becomes an :class:`_Undecodable` instead, which
    the wrapped handler raises.
    """
    if deserializer is None:
        return None
    message_type = _message_type(deserializer)

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            error = InvalidArgument("request", f"is not a valid {message_type}: {exc}")
            if request_streaming:
                raise error from exc
            return _Undecodable(error)

    return decode


def _wrap_unary(
    behavior: Callable[..., Awaitable[Any]], method: str
) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(_decoded(request), context)
        except (grpc.aio.AbortError, AssertionError, KeyboardInterrupt):
            raise
        except Exception as exc:
            await abort(context, exc, method)

    return handler


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def generator(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for response in behavior(_decoded(request), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, exc, method)

        return generator
    return _wrap_unary(behavior, method)


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
        wrapped = _wrap_handler(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


_KINDS = {
    "unary_unary": (grpc.unary_unary_rpc_method_handler, _wrap_unary),
    "unary_stream": (grpc.unary_stream_rpc_method_handler, _wrap_stream),
    "stream_unary": (grpc.stream_unary_rpc_method_handler, _wrap_unary),
    "stream_stream": (grpc.stream_stream_rpc_method_handler, _wrap_stream),
}


def _wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    for attribute, (make, wrap) in _KINDS.items():
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return make(
                wrap(behavior, method),
                request_deserializer=_decoder(
                    handler.request_deserializer, handler.request_streaming
                ),
                response_serializer=handler.response_serializer,
            )
    return handler
