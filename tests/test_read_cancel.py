"""A history read that its client cancels while PostgreSQL runs it.

The statement is held on a lock (another session holds ``fixes`` exclusively), so
the cancel lands while it runs. The pool has one connection: the same backend must
serve the next read, the call ends as CANCELLED and nothing is logged as an error.
psycopg does the work (on a cancelled task it asks the server to cancel the
statement and reads its end; see docs/storage.md, Faults): these tests keep it so.

A read that PostgreSQL cancels itself (its statement_timeout or lock_timeout, an
operator) is not tried again, and its status says the database cancelled it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import quote

import grpc
import psycopg
import pytest
from tracking.v1 import history_pb2, history_pb2_grpc, track_pb2_grpc

from tests.activity.test_history_rpc import DAY_MS, T0, commute, publish
from tests.backends import create_database, drop_database
from tests.server_fixtures import embedded_settings
from tracking_grpc.server import TrackingServer

pytestmark = pytest.mark.postgres
SPAN = {"device_id": "car", "start_ms": T0, "end_ms": T0 + DAY_MS}
ACCESS_LOG = "tracking_grpc.observability.interceptor"
LOCKED_COPIES = (
    "SELECT pid, query_start FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock' "
    "AND query LIKE '%%COPY%%' AND query_start > %s"
)


@pytest.fixture
async def pg_own_url(pg_session_prefix: str, pg_template: str) -> AsyncIterator[str]:
    """A migrated database of this test alone (its lock stalls no other test)."""
    name = f"{pg_session_prefix}_{uuid.uuid4().hex[:8]}"
    yield create_database(name, template=pg_template)
    drop_database(name)


@pytest.fixture
async def one_connection_server(tmp_path, pg_own_url) -> AsyncIterator[TrackingServer]:
    settings = embedded_settings(
        tmp_path, database_url=pg_own_url, database_pool_size=1, max_fix_age_s=0
    )
    server = await TrackingServer.start(settings)
    yield server
    await server.stop(0)


@contextlib.asynccontextmanager
async def history_and_locker(
    server: TrackingServer, url: str
) -> AsyncIterator[
    tuple[
        history_pb2_grpc.HistoryStub, psycopg.AsyncConnection, psycopg.AsyncConnection
    ]
]:
    """A History stub of ``server`` with the commute stored, a connection to watch
    and cancel backends with, and one to hold ``fixes`` locked."""
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as admin,
        await psycopg.AsyncConnection.connect(url) as locker,
    ):
        await publish(track_pb2_grpc.TrackSessionStub(channel), commute())
        yield history_pb2_grpc.HistoryStub(channel), admin, locker


def start_call(stub: history_pb2_grpc.HistoryStub, rpc: str):
    """The call, and for a stream its first read (which sends the request)."""
    if rpc == "GetTrack":
        call = stub.GetTrack(history_pb2.GetTrackRequest(**SPAN))
        return call, asyncio.ensure_future(call.read())
    return stub.TimeInFences(history_pb2.TimeInFencesRequest(**SPAN)), None


async def finish_call(stub: history_pb2_grpc.HistoryStub, rpc: str) -> int:
    """Positions of the whole track, or fences timed."""
    if rpc == "GetTrack":
        request = history_pb2.GetTrackRequest(**SPAN)
        return sum([len(r.positions) async for r in stub.GetTrack(request)])
    reply = await stub.TimeInFences(history_pb2.TimeInFencesRequest(**SPAN))
    return len(reply.fences) + 1


async def blocked_backend(
    admin: psycopg.AsyncConnection, after: datetime | None = None
) -> tuple[int, datetime]:
    """The pid and start of the COPY that waits for the lock on ``fixes`` (one
    started after ``after``, when given)."""
    async with asyncio.timeout(60):
        while True:
            cur = await admin.execute(
                LOCKED_COPIES, [after or datetime.min.replace(tzinfo=UTC)]
            )
            row = await cur.fetchone()
            if row is not None:
                return row
            await asyncio.sleep(0.02)


async def blocked_reads(
    admin: psycopg.AsyncConnection, call: grpc.aio.Call
) -> set[tuple[int, datetime]]:
    """Every COPY (pid and start) seen waiting for the lock on ``fixes`` until
    ``call`` ends."""
    seen: set[tuple[int, datetime]] = set()
    while not call.done():
        cur = await admin.execute(LOCKED_COPIES, [datetime.min.replace(tzinfo=UTC)])
        seen.update(await cur.fetchall())
        await asyncio.sleep(0.02)
    return seen


async def cancelled_logged(caplog: pytest.LogCaptureFixture, count: int) -> None:
    """Wait for the access log's ``count``-th CANCELLED line."""
    async with asyncio.timeout(30):
        while True:
            lines = [r.getMessage() for r in caplog.records]
            if sum("finished CANCELLED" in line for line in lines) >= count:
                return
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("rpc", ["GetTrack", "TimeInFences"])
async def test_a_cancelled_read_keeps_its_connection(
    one_connection_server, pg_own_url, caplog, rpc
):
    server = one_connection_server
    caplog.set_level(logging.DEBUG, logger=ACCESS_LOG)
    async with history_and_locker(server, pg_own_url) as (stub, admin, locker):
        opened = server.app.history._pool.get_stats()["connections_num"]
        pids = []
        for round_ in (1, 2):
            await locker.execute("LOCK TABLE fixes IN ACCESS EXCLUSIVE MODE")
            call, first_read = start_call(stub, rpc)
            pids.append((await blocked_backend(admin))[0])
            call.cancel()
            await cancelled_logged(caplog, round_)
            await locker.rollback()
            if first_read is not None:
                with pytest.raises(asyncio.CancelledError):
                    await first_read
        assert await finish_call(stub, rpc) > 0

    stats = server.app.history._pool.get_stats()
    assert pids[0] == pids[1]
    assert stats["connections_num"] == opened
    assert "returns_bad" not in stats and "connections_lost" not in stats
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.name.startswith("psycopg")]


CANCELLED_BY_THE_DATABASE = [
    pytest.param(
        {"options": "-c statement_timeout=2000", "database_timeout_s": 30.0},
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "statement timeout",
        id="statement-timeout",
    ),
    pytest.param(
        {"database_timeout_s": 2.0},
        grpc.StatusCode.UNAVAILABLE,
        "lock timeout",
        id="lock-timeout",
    ),
    pytest.param(
        {"operator_cancels": True},
        grpc.StatusCode.UNAVAILABLE,
        "user request",
        id="operator-cancel",
    ),
]


@pytest.mark.parametrize(("how", "code", "cause"), CANCELLED_BY_THE_DATABASE)
async def test_a_read_the_database_cancels_is_not_retried(
    tmp_path, pg_own_url, how, code, cause
):
    """Cancelled by PostgreSQL, not the client: the same read at once would most
    likely fail alike, so it runs once and its status says why."""
    options = how.get("options")
    settings = embedded_settings(
        tmp_path,
        database_url=pg_own_url + (f"?options={quote(options)}" if options else ""),
        database_pool_size=1,
        database_timeout_s=how.get("database_timeout_s", 5.0),
        max_fix_age_s=0,
    )
    server = await TrackingServer.start(settings)
    try:
        async with history_and_locker(server, pg_own_url) as (stub, admin, locker):
            await locker.execute("LOCK TABLE fixes IN ACCESS EXCLUSIVE MODE")
            call = stub.TimeInFences(history_pb2.TimeInFencesRequest(**SPAN))
            seen = asyncio.ensure_future(blocked_reads(admin, call))
            cancelled: set[tuple[int, datetime]] = set()
            if how.get("operator_cancels"):
                pid, start = await blocked_backend(admin)
                # blocked_reads may not look before the cancel: count this read
                cancelled.add((pid, start))
                await admin.execute("SELECT pg_cancel_backend(%s)", [pid])
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call
            await locker.rollback()
            assert await finish_call(stub, "TimeInFences") > 0
    finally:
        await server.stop(0)

    assert failed.value.code() == code
    assert "the database cancelled the query" in failed.value.details()
    assert cause in failed.value.details()
    assert len(await seen | cancelled) == 1  # one attempt
