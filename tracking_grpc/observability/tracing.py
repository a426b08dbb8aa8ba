"""OpenTelemetry tracing: server spans per RPC, and :func:`span` for the rest.

Tracing is off unless ``otlp_endpoint`` is set (or a test passes an exporter to
:func:`configure`); while off, :func:`span` costs one branch. The provider is kept
here rather than installed globally, so tests can configure it more than once.

    with tracing.span("storage.flush", backend="postgresql", fixes=n):
        ...

A span started inside an RPC is a child of that RPC's server span. Work done for
several callers at once (a group commit) can carry links to the callers' spans:
capture :func:`current_context` where the work is submitted and pass the contexts
as ``links``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from tracking_grpc import __version__
from tracking_grpc.config import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = "tracking-grpc"
SpanContext = trace.SpanContext
INVALID_CONTEXT = trace.INVALID_SPAN_CONTEXT

_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def enabled() -> bool:
    return _tracer is not None


def configure(settings: Settings, exporter: SpanExporter | None = None) -> bool:
    """Start tracing when ``otlp_endpoint`` is set or an exporter is given.

    A given exporter gets every span as it ends (tests); the OTLP exporter sends
    batches in the background. Returns whether tracing is on.
    """
    global _provider, _tracer
    shutdown()
    if exporter is None and not settings.otlp_endpoint:
        return False
    ratio = min(max(settings.trace_sample_ratio, 0.0), 1.0)
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": SERVICE_NAME, "service.version": __version__}
        ),
        sampler=ParentBased(TraceIdRatioBased(ratio)),
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        otlp = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
        provider.add_span_processor(BatchSpanProcessor(otlp))
        log.info("tracing to %s, sampling %.3f", settings.otlp_endpoint, ratio)
    _provider = provider
    _tracer = provider.get_tracer("tracking_grpc", __version__)
    return True


def shutdown() -> None:
    """Flush and stop the provider (on server shutdown)."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = None
    _tracer = None


def server_interceptor() -> grpc.aio.ServerInterceptor | None:
    """A server span per RPC (OpenTelemetry's aio interceptor), or None when off."""
    if _provider is None:
        return None
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return _ServerSpans(aio_server_interceptor(tracer_provider=_provider))


class _ServerSpans(grpc.aio.ServerInterceptor):
    """OpenTelemetry's aio server interceptor, also for ``context.write`` streams.

    The library's stream wrapper iterates the handler's result, which works for
    async generators only; a streaming handler that is a coroutine writing with
    ``context.write`` (Track, grpc's health Watch) gets the library's coroutine
    wrapper instead, which opens and closes the same server span around it.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        if handler.response_streaming and not _is_generator(handler):
            return _coroutine_stream(self.inner, handler, details)

        async def resolved(_details: Any) -> Any:
            return handler

        return await self.inner.intercept_service(resolved, details)


def _is_generator(handler: grpc.RpcMethodHandler) -> bool:
    return inspect.isasyncgenfunction(handler.stream_stream or handler.unary_stream)


def _coroutine_stream(inner: Any, handler: Any, details: Any) -> grpc.RpcMethodHandler:
    # _intercept_aio_server_unary awaits the behaviour inside the server span; it
    # is private to opentelemetry-instrumentation-grpc (pinned in pyproject.toml).
    if handler.request_streaming:
        wrapped = inner._intercept_aio_server_unary(handler.stream_stream, details)
        make = grpc.stream_stream_rpc_method_handler
    else:
        wrapped = inner._intercept_aio_server_unary(handler.unary_stream, details)
        make = grpc.unary_stream_rpc_method_handler
    return make(wrapped, handler.request_deserializer, handler.response_serializer)


class _NoSpan:
    """What :func:`span` returns while tracing is off."""

    __slots__ = ()

    def __enter__(self) -> trace.Span:
        return trace.INVALID_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(
    name: str,
    links: Iterable[trace.SpanContext] = (),
    **attributes: str | int | float | bool,
) -> Any:
    """A context manager: a span named ``name``, child of the current span."""
    if _tracer is None:
        return _NO_SPAN
    return _started(_tracer, name, links, attributes)


@contextmanager
def _started(
    tracer: trace.Tracer,
    name: str,
    links: Iterable[trace.SpanContext],
    attributes: dict[str, Any],
) -> Iterator[trace.Span]:
    span_links = [trace.Link(c) for c in links if c.is_valid]
    with tracer.start_as_current_span(
        name, links=span_links, attributes=attributes
    ) as current:
        yield current


def current_context() -> trace.SpanContext:
    """The current span's context (invalid when tracing is off or no span is open)."""
    return trace.get_current_span().get_span_context()


def ids() -> tuple[str, str]:
    """Hex trace and span id of the current span, or empty strings."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
