"""``serve --workers N``: N server processes sharing one port.

The supervisor forks the workers before any of them starts a server (gRPC and event
loops do not survive a fork), each worker binds the same address with SO_REUSEPORT
and the kernel spreads new connections over them. Workers share nothing but the
backends (PostgreSQL, Redis), exactly as servers on different machines would. The
supervisor forwards SIGINT/SIGTERM, serves the summed metrics if enabled, and exits
when every worker has; a worker that dies leaves the others serving.
"""

from __future__ import annotations

import logging
import os
import signal

from tracking_grpc.config import Settings, check
from tracking_grpc.errors import InvalidArgument

log = logging.getLogger(__name__)


def check_workers(settings: Settings) -> None:
    """The settings' own checks, then what several workers need: a fixed port (with
    port 0 each would pick its own) and shared backends."""
    check(settings)
    _, _, port = settings.listen.rpartition(":")
    if settings.workers > 1 and port in ("", "0"):
        raise InvalidArgument("listen", "--workers above 1 needs a fixed port")
    if settings.workers > 1 and not (settings.database_url and settings.redis_url):
        # Each worker would have its own SQLite writer and its own live positions.
        raise InvalidArgument(
            "workers",
            "several workers share state only through PostgreSQL and Redis: "
            "set database_url and redis_url",
        )


def supervise(settings: Settings) -> int:
    """Fork the workers, wait for them; returns the exit code for the command."""
    from tracking_grpc.observability import Telemetry, metrics

    check_workers(settings)
    Telemetry.prepare_workers(settings)
    workers = [_fork_worker(settings, index) for index in range(settings.workers)]
    log.info("started %d workers on %s: %s", len(workers), settings.listen, workers)

    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    metrics_server = None
    if settings.metrics_listen:
        metrics.enable()
        metrics_server, _ = metrics.serve(settings.metrics_listen)
    failed = 0
    remaining = set(workers)
    while remaining:
        pid, status = os.wait()
        remaining.discard(pid)
        metrics.worker_exited(pid)
        code = os.waitstatus_to_exitcode(status)
        # A worker still starting when we forwarded a stop dies of that signal
        # (its own handler was not installed yet): a stop, not a failure.
        if code != 0 and -code not in stopping:
            failed += 1
            log.error("worker %d exited with %d; %d left", pid, code, len(remaining))
    if metrics_server is not None:
        metrics_server.shutdown()
    return 1 if failed else 0


def _fork_worker(settings: Settings, index: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = _run_worker(settings, index)
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)


def _run_worker(settings: Settings, index: int) -> int:
    import uvloop

    from tracking_grpc.observability import Telemetry
    from tracking_grpc.server import serve

    log.info("worker %d (pid %d) starting", index, os.getpid())

    async def run() -> None:
        await serve(settings, Telemetry(settings, worker=True))

    uvloop.run(run())
    return 0
