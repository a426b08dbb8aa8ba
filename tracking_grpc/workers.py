"""``serve --workers N``: N server processes sharing one port.

The supervisor forks the workers before any of them starts a server (gRPC and event
loops do not survive a fork), each worker binds the same address with SO_REUSEPORT
and the kernel spreads new connections over them. Workers share nothing but the
backends (PostgreSQL, Redis), exactly as servers on different machines would. The
supervisor forwards SIGINT/SIGTERM, serves the summed metrics if enabled, and exits
when every worker has. Workers die with the supervisor: killed outright (SIGKILL,
the OOM killer), it cannot forward a stop, so each worker asks the kernel for a
SIGTERM when its parent goes (Linux), and stops as it would on a forwarded one.
A worker that dies leaves the others serving, and the
supervisor starts another in its place; one that keeps dying within
``STEADY_S`` of its start is replaced after a growing pause, and given up after
``MAX_QUICK_DEATHS`` such deaths in a row (a bad setting or backend, not bad luck).
Before forking, the supervisor makes sure nothing listens on the address yet: with
SO_REUSEPORT a second supervisor's workers would otherwise share the port with the
first's. A worker still running ``KILL_AFTER_S`` after a stop was forwarded (hung,
or stopped with SIGSTOP) is killed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from tracking_grpc.config import Settings, check
from tracking_grpc.errors import InvalidArgument

log = logging.getLogger(__name__)

STEADY_S = 30.0  # a worker that lived this long died of bad luck, not of its setup
MAX_QUICK_DEATHS = 5
MAX_PAUSE_S = 5.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
KILL_AFTER_S = 15.0  # the server's 5-s grace, and time to flush and close
POLL_S = 0.1


@dataclass(slots=True)
class _Slot:
    """One of the N worker places: its index, when its worker started, and how
    many of its workers in a row died before ``STEADY_S``."""

    index: int
    started: float
    quick_deaths: int = 0

    def died(self) -> float | None:
        """The pause before a replacement, or None to give the place up."""
        quick = time.monotonic() - self.started < STEADY_S
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        if self.quick_deaths >= MAX_QUICK_DEATHS:
            return None
        return min(MAX_PAUSE_S, 0.5 * 2**self.quick_deaths) if quick else 0.0


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
    """Fork the workers, replace those that die, wait for them all to stop; the
    exit code for the command: 1 if a worker's place was given up."""
    from tracking_grpc.observability import Telemetry, metrics

    check_workers(settings)
    check_listen_free(settings.listen)
    Telemetry.prepare_workers(settings)
    workers = {
        _fork_worker(settings, i): _Slot(i, time.monotonic())
        for i in range(settings.workers)
    }
    log.info("started %d workers on %s: %s", len(workers), settings.listen, workers)

    stopping: list[int] = []
    kill_at = [float("inf")]

    def forward(signum: int, _frame: object) -> None:
        if not stopping:
            kill_at[0] = time.monotonic() + KILL_AFTER_S
        stopping.append(signum)
        for pid in list(workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    metrics_server = None
    if settings.metrics_listen:
        metrics.enable()
        try:
            metrics_server, _ = metrics.serve(settings.metrics_listen)
        except InvalidArgument:  # the port is taken: stop the workers, then say so
            forward(signal.SIGTERM, None)
            for pid in workers:
                os.waitpid(pid, 0)
            raise
    failed = 0
    while workers:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:  # polled, so that a stop's deadline is noticed
            if time.monotonic() > kill_at[0]:
                log.error("workers %s still running after a stop; killed", workers)
                for hung in workers:
                    _kill(hung)
                kill_at[0] = float("inf")
            time.sleep(POLL_S)
            continue
        slot = workers.pop(pid, None)
        if slot is None:
            continue
        metrics.worker_exited(pid)
        code = os.waitstatus_to_exitcode(status)
        # A worker still starting when we forwarded a stop dies of that signal
        # (its own handler was not installed yet): a stop, not a failure.
        if code == 0 or -code in stopping:
            continue
        log.error("worker %d exited with %d; %d left", pid, code, len(workers))
        pause = slot.died()
        if pause is None:
            failed += 1
            log.error("worker %d died %d times right after starting; not replaced",
                      slot.index, MAX_QUICK_DEATHS)  # fmt: skip
            continue
        time.sleep(pause)
        if not stopping:
            replacement = _fork_worker(settings, slot.index)
            slot.started = time.monotonic()
            workers[replacement] = slot
            log.warning("worker %d replaced by pid %d", slot.index, replacement)
            if stopping:  # the stop came while it was being forked
                forward(stopping[-1], None)
    if metrics_server is not None:
        metrics_server.shutdown()
    return 1 if failed else 0


def check_listen_free(listen: str) -> None:
    """InvalidArgument unless ``listen`` can be bound now by a socket without
    SO_REUSEPORT: nothing, another supervisor's workers included, listens there."""
    host, _, port = listen.rpartition(":")
    reason = f"cannot listen on {listen}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise InvalidArgument("listen", f"{reason}: {exc.strerror}") from exc


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _fork_worker(settings: Settings, index: int) -> int:
    supervisor = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        # Not the supervisor's forwarding (inherited by a replacement): a stop
        # before the worker's own handlers are in place ends it.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if _follow_parent(supervisor):
            code = _run_worker(settings, index)
        else:
            log.error("worker %d: the supervisor died as it was started", index)
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)


def _follow_parent(supervisor: int) -> bool:
    """Have the kernel send this process SIGTERM when its parent dies; whether the
    parent is still ``supervisor`` (it may have died before the request: then this
    process was already handed to another parent, and no signal will come)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            error = ctypes.get_errno()
            reason = os.strerror(error)
            log.warning("a killed supervisor will leave this worker: %s", reason)
    return os.getppid() == supervisor


def _run_worker(settings: Settings, index: int) -> int:
    import uvloop

    from tracking_grpc.observability import Telemetry
    from tracking_grpc.server import serve

    log.info("worker %d (pid %d) starting", index, os.getpid())

    async def run() -> None:
        await serve(settings, Telemetry(settings, worker=True))

    uvloop.run(run())
    return 0
