"""What an operator sees: metrics, traces and logs.

:func:`.logs.configure` sets up log output once per process (the CLI does);
:class:`Telemetry` sets up tracing and metrics for a server; :mod:`.metrics` and
:mod:`.tracing` hold the functions the rest of the service calls, each cheap while
its part is off.

    telemetry = Telemetry(settings)
    server = grpc.aio.server(interceptors=telemetry.interceptors())
    await telemetry.start()   # /metrics endpoint, GC pauses and event-loop lag
    ...
    await telemetry.stop()

With several worker processes the supervisor calls :meth:`Telemetry.prepare_workers`
before starting them and serves ``/metrics`` (summed over workers); each worker
makes its own ``Telemetry(settings, worker=True)``, which records but does not serve.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from tracking_grpc.config import Settings
from tracking_grpc.observability import metrics, tracing
from tracking_grpc.observability.runtime import RuntimeMonitor

log = logging.getLogger(__name__)


class Telemetry:
    """Tracing and metrics of one server process, configured from the settings."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker: bool = False,
        span_exporter: Any = None,
    ) -> None:
        self.settings = settings
        self.serves_metrics = bool(settings.metrics_listen) and not worker
        tracing.configure(settings, exporter=span_exporter)
        if settings.metrics_listen:
            metrics.enable()
        else:
            metrics.disable()
        self.metrics_server: Any = None
        self.runtime = RuntimeMonitor() if settings.metrics_listen else None

    @staticmethod
    def prepare_workers(settings: Settings) -> None:
        """In the supervisor, before starting workers: one shared metrics directory."""
        if settings.metrics_listen:
            metrics.prepare_workers()

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        from tracking_grpc.observability.interceptor import server_interceptors

        return server_interceptors(self.settings)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.server_port if self.metrics_server else None

    async def start(self) -> None:
        """Serve /metrics, unless this process is a worker (the supervisor does)."""
        if self.serves_metrics:
            self.metrics_server, _ = metrics.serve(self.settings.metrics_listen)
        if self.runtime is not None:
            self.runtime.start()

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        tracing.shutdown()
