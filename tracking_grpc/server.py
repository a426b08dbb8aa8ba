"""The gRPC server: services, health, reflection, interceptors and shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tracking_grpc import config
from tracking_grpc.app import App, open_app
from tracking_grpc.config import Settings
from tracking_grpc.errors import InvalidArgument, Unavailable
from tracking_grpc.interceptors import ErrorInterceptor
from tracking_grpc.observability import Telemetry, metrics
from tracking_grpc.retention import RetentionKeeper
from tracking_grpc.servicers import geofence, history, route, track
from tracking_grpc.storage.base import HistoryStore, LiveStore

log = logging.getLogger(__name__)

Register = Callable[[grpc.aio.Server, App], str]

# Each entry adds one service to the server and returns its full name.
SERVICES: list[Register] = [
    track.register,
    history.register,
    route.register,
    geofence.register,
]

SHUTDOWN_GRACE_S = 5.0
GC_YOUNG_THRESHOLD = 500  # net allocations between young passes (default 700)
GC_MIDDLE_THRESHOLD = 20_000  # young passes between middle ones (default 10)
DEPENDENCY_CHECK_S = 1.0
CHECK_TIMEOUT_S = 3.0
# Health service names of the dependencies; "" and the services follow history,
# the one dependency without which a process cannot serve (it could ack nothing).
HISTORY_HEALTH = "tracking.dependency.history"
LIVE_HEALTH = "tracking.dependency.live"


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel options: a backlog large enough for a reconnect storm of devices, and
    a fixed receive window per stream (``stream_window_kb``).

    A stream that is being read gets a window as large as the message it reads
    needs, whatever the setting; the fixed window bounds what a stream that is not
    read holds: a Track stream whose device reads no acks is not read either, and
    with the bandwidth-delay probe its window grew to about 4 MB of unread batches.
    """
    backlog = settings.max_concurrent_streams
    window = []
    if settings.stream_window_kb:
        window = [
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", settings.stream_window_kb * 1024),
        ]
    return [
        *window,
        ("grpc.server.max_pending_requests", backlog),
        ("grpc.server.max_pending_requests_hard_limit", backlog * 2),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ]


class TrackingServer:
    """A running server and its application; ``stop`` drains and flushes."""

    def __init__(
        self, app: App, server: grpc.aio.Server, port: int, telemetry: Telemetry
    ) -> None:
        self.app = app
        self.server = server
        self.port = port
        self.telemetry = telemetry
        self.health = health.aio.HealthServicer()
        self.service_names: list[str] = []
        self.dependencies_up = {HISTORY_HEALTH: True, LIVE_HEALTH: True}
        self.retention: RetentionKeeper | None = None
        self._stopped = False
        self._dependency_task: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls, settings: Settings, telemetry: Telemetry | None = None
    ) -> TrackingServer:
        config.check(settings)
        telemetry = telemetry or Telemetry(settings)
        app = await open_app(settings)
        try:
            server = grpc.aio.server(
                interceptors=[*telemetry.interceptors(), ErrorInterceptor()],
                options=server_options(settings),
            )
            port = _bind(server, settings.listen)
            running = cls(app, server, port, telemetry)
            running.service_names = [register(server, app) for register in SERVICES]
            if settings.retention_days:
                running.retention = _keep_history(app)
            health_pb2_grpc.add_HealthServicer_to_server(running.health, server)
            reflection.enable_server_reflection(
                [*running.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME],
                server,
            )
            await telemetry.start()  # a taken metrics port fails before serving
            await server.start()
        except BaseException:
            await app.close()
            await telemetry.stop()
            raise
        await running.set_serving(True)
        running._dependency_task = asyncio.create_task(
            running._watch_dependencies(), name="dependency-health"
        )
        log.info("listening on %s (port %d)", settings.listen, port)
        return running

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            ready = name not in self.app.not_ready
            await self.health.set(name, status if ready else not_serving)
        for name, up in self.dependencies_up.items():
            await self.health.set(name, status if up else not_serving)

    async def check_dependencies(self) -> dict[str, bool]:
        """Probe history and live state once and publish the result in health."""
        probes: dict[str, HistoryStore | LiveStore] = {
            HISTORY_HEALTH: self.app.history,
            LIVE_HEALTH: self.app.live,
        }
        for name, store in probes.items():
            started_s = time.perf_counter()
            up = await _answers(store)
            seconds = time.perf_counter() - started_s
            metrics.dependency_checked(metrics.backend_name(store), up, seconds)
            # Live state that still lacks updates (not yet rebuilt) is not served.
            up = up and not getattr(store, "needs_rebuild", False)
            if up != self.dependencies_up[name]:
                log.warning("%s is %s", name, "back" if up else "NOT serving")
            self.dependencies_up[name] = up
        if not self._stopped:
            await self.set_serving(self.dependencies_up[HISTORY_HEALTH])
        return dict(self.dependencies_up)

    async def _watch_dependencies(self) -> None:
        while True:
            await asyncio.sleep(DEPENDENCY_CHECK_S)
            await self.check_dependencies()

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop accepting calls, let open calls finish for ``grace_s``, flush writes.

        The event processors go on with their backlog until ``grace_s`` after the
        stop began; what they have not begun by then is left unprocessed (and
        logged), however long it is after a burst.
        """
        if self._stopped:
            return
        self._stopped = True
        deadline = asyncio.get_running_loop().time() + grace_s
        if self._dependency_task is not None:
            self._dependency_task.cancel()
            await asyncio.gather(self._dependency_task, return_exceptions=True)
        await self.set_serving(False)
        await self.server.stop(grace_s)
        await self.app.close(deadline)
        await self.telemetry.stop()
        log.info("stopped")


def _keep_history(app: App) -> RetentionKeeper:
    """Start enforcing ``retention_days``; stopped with the application."""
    keeper = RetentionKeeper(
        app.history, app.live, app.purgers, app.settings.retention_days
    )
    keeper.start()
    app.closers.append(keeper.stop)
    return keeper


def _bind(server: grpc.aio.Server, listen: str) -> int:
    """Add the listening address; the port bound. ``InvalidArgument`` when it
    cannot be bound (taken by another process, or not an address of this host)."""
    reason = f"cannot listen on {listen} (the port is taken, or the address is not "
    reason += "this machine's)"
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:  # grpcio's "Failed to bind to address"
        raise InvalidArgument("listen", reason) from exc
    if port == 0:  # older grpcio answers 0 instead
        raise InvalidArgument("listen", reason)
    return port


async def _answers(store: HistoryStore | LiveStore) -> bool:
    """Whether a store's ``ping`` succeeds within the check timeout.

    The answer does not wait for a late ping to finish cancelling: psycopg cancels
    a query it is interrupted in and waits for it to end (5 s, then 5 s more),
    so a PostgreSQL that stopped answering (frozen, a partition without resets)
    was reported NOT_SERVING 13 s after it stopped instead of 3 s, and the
    dependency loop probed nothing else meanwhile. The late ping ends on its own.
    """
    ping = asyncio.ensure_future(store.ping())
    try:
        done, _ = await asyncio.wait({ping}, timeout=CHECK_TIMEOUT_S)
    except asyncio.CancelledError:
        ping.cancel()
        raise
    if not done:
        ping.cancel()
        ping.add_done_callback(_consume)
        return False
    try:
        ping.result()
    except Unavailable:
        return False
    return True


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def tune_gc() -> None:
    """Collect garbage in short, frequent young passes and rare older ones.

    Freezing what start-up built keeps full collections off it. Each open stream
    holds a pending read (two dozen objects) that lives until its next message, so
    the young generation holds the reads started since the last pass: with the
    young threshold at 50,000 a pass came every ~20 s and walked every stream's
    read, stopping the loop for 110-140 ms at 10k streams; at 500 a pass walks the
    last fraction of a second's reads (0.6 ms at p50, 5 ms at most). The reads a
    young pass finds alive move to the middle generation, whose pass walks them
    all again: it runs only after ``GC_MIDDLE_THRESHOLD`` young passes (minutes
    under load). Garbage the collector frees is a few objects a second here, so
    little waits that long (bench/README.md, seventh pass).
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_MIDDLE_THRESHOLD, 100)


async def serve(settings: Settings, telemetry: Telemetry | None = None) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    running = await TrackingServer.start(settings, telemetry)
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down")
    await running.stop()
