"""An export cancelled by its client while PostgreSQL stops answering.

psycopg, on a task cancelled in a ``COPY TO``, asks the server to cancel the
statement (5 s for an answer), waits 5 s for the copy's next row, and once it has
one reads the rest of the copy with no time limit. A frozen PostgreSQL (SIGSTOP)
answers no cancel request and sends nothing more: without a limit of the store's
own, the server's handler and its pooled connection waited for it forever.

A private PostgreSQL, reached through its Unix socket (whose small buffer a 50,000
fix copy overfills many times). The postmaster is frozen, so psycopg's cancel
request is not answered; the call is cancelled in the middle of the copy, and once
psycopg has given up asking (and the copy has filled the socket again) the backend
is frozen too. Each step waits for an event, none for a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import psycopg
import pytest
from tracking.v1 import history_pb2, history_pb2_grpc

from tests.backends import require_service
from tests.server_fixtures import embedded_settings
from tests.services import PostgresServer
from tracking_grpc.server import TrackingServer
from tracking_grpc.storage import schema

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
T0 = 1_700_000_000_000  # November 2023: the default partition, none made at start
FIXES = 50_000
EXPORT = history_pb2.ExportTrackRequest(
    track=history_pb2.GetTrackRequest(
        device_id="van", start_ms=T0, end_ms=T0 + (FIXES + 1) * 1000
    ),
    format=history_pb2.EXPORT_FORMAT_CSV,
)
ACCESS_LOG = "tracking_grpc.observability.interceptor"
# Longer than psycopg's two 5-s waits for a cancel request, so that the copy's
# reader is past them when the limit comes.
LIMIT_S = 12.0
WAIT_S = 60.0


@pytest.fixture(scope="module")
def postgres_with_track() -> Iterator[PostgresServer]:
    """A private PostgreSQL with a migrated database holding one long track."""
    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        require_service("PostgreSQL binaries", str(exc))
    server.start()
    try:
        with psycopg.connect(server.admin_url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE tracking")
        asyncio.run(schema.migrate(server.url("tracking")))
        with psycopg.connect(server.url("tracking"), autocommit=True) as conn:
            conn.execute(
                "INSERT INTO fixes (tenant, device, time_ms, seq, position, "
                "received_ms) SELECT 'default', 'van', %(t0)s + g * 1000, g, "
                "ST_SetSRID(ST_MakePoint(24.9 + g * 1e-6, 60.17), 4326), "
                "%(t0)s + g * 1000 FROM generate_series(1, %(n)s) g",
                {"t0": T0, "n": FIXES},
            )
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def one_connection_server(
    tmp_path, postgres_with_track
) -> AsyncIterator[TrackingServer]:
    pg = postgres_with_track
    settings = embedded_settings(
        tmp_path,
        database_url=f"postgresql://postgres@/tracking?host={pg.dir}&port={pg.port}",
        database_pool_size=1,
        database_timeout_s=LIMIT_S,
        max_fix_age_s=0,
    )
    server = await TrackingServer.start(settings)
    yield server
    await server.stop(0)


class Freezer:
    """SIGSTOP and SIGCONT for the test's PostgreSQL processes; all thawed at exit."""

    def __init__(self) -> None:
        self.frozen: set[int] = set()

    def freeze(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.frozen.add(pid)

    def thaw(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        self.frozen.discard(pid)

    def thaw_all(self) -> None:
        for pid in list(self.frozen):
            with contextlib.suppress(ProcessLookupError):
                self.thaw(pid)


@contextlib.contextmanager
def freezer() -> Iterator[Freezer]:
    frozen = Freezer()
    try:
        yield frozen
    finally:
        frozen.thaw_all()


def copy_waiting(admin: psycopg.Connection, wait_event: str) -> int | None:
    """The pid of the backend whose COPY waits for ``wait_event``."""
    row = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = 'tracking' "
        "AND query LIKE '%%COPY%%' AND wait_event = %s",
        [wait_event],
    ).fetchone()
    return None if row is None else int(row[0])


def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


async def until[T](check: Callable[[], T], what: str) -> T:
    """The first true answer of ``check``, polled while the event loop runs."""
    deadline = time.monotonic() + WAIT_S
    while not (answer := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {WAIT_S} s")
        await asyncio.sleep(0.02)
    return answer


def until_holding_the_loop[T](check: Callable[[], T], what: str) -> T:
    """The same, while holding the event loop: the server reads nothing."""
    deadline = time.monotonic() + WAIT_S
    while not (answer := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {WAIT_S} s")
        time.sleep(0.02)
    return answer


async def test_a_cancelled_export_lets_go_of_a_frozen_postgres(
    one_connection_server, postgres_with_track, caplog
):
    server, pg = one_connection_server, postgres_with_track
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    caplog.set_level(logging.DEBUG, logger=ACCESS_LOG)
    with (
        psycopg.connect(pg.url("tracking"), autocommit=True) as admin,
        psycopg.connect(pg.url("tracking")) as locker,
        freezer() as freeze,
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = history_pb2_grpc.HistoryStub(channel)
            locker.execute("LOCK TABLE fixes IN ACCESS EXCLUSIVE MODE")
            call = stub.ExportTrack(EXPORT)
            first = asyncio.ensure_future(call.read())
            await until(lambda: copy_waiting(admin, "relation"), "COPY on the lock")

            freeze.freeze(postmaster)  # answers no cancel request

            # The copy fills the socket while the server cannot read it, and the
            # call is cancelled in the middle of it.
            locker.rollback()
            backend = until_holding_the_loop(
                lambda: copy_waiting(admin, "ClientWrite"), "full socket"
            )
            call.cancel()

            # psycopg gave up asking (the socket full again meanwhile): once it
            # has read the rows waiting there, no more come.
            await until(lambda: logged(caplog, "cancellation failed"), "warning")
            freeze.freeze(backend)

            await until(lambda: logged(caplog, "finished CANCELLED"), "call's end")
            stats = server.app.history._pool.get_stats()
            freeze.thaw_all()
            with pytest.raises(asyncio.CancelledError):
                await first
            data = b"".join([r.data async for r in stub.ExportTrack(EXPORT)])

    assert stats.get("returns_bad") == 1  # the frozen connection was dropped
    assert logged(caplog, "did not end a cancelled statement") == 1
    assert len(data.decode().splitlines()) == FIXES + 1  # a header, then the fixes
