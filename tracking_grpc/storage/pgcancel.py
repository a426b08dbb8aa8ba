"""A statement whose caller is cancelled gets a time limit to end.

psycopg, interrupted in a statement, asks the server to cancel it and reads what
the server still sends until it ends, so that the connection goes back to the pool
idle. Each step waits up to 5 s, except the last one of a ``COPY TO``: once it has
had a row since asking, it reads the rest of the copy for as long as that takes.
With a server that stopped answering (frozen, paused, a connection gone silent) it
never ends: the cancelled call's task and its pooled connection were held forever.

:func:`run_cancellable` gives that work ``limit_s``; after it the connection's
socket is shut down, which ends psycopg's reading at once (or after its own 5-s wait
for a cancel request still going out) and the pool replaces the connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable

import psycopg

log = logging.getLogger(__name__)


async def run_cancellable[T](
    work: Awaitable[T], conn: psycopg.AsyncConnection, limit_s: float
) -> T:
    """``work`` on ``conn``; when the caller is cancelled, the statement's own
    cancellation gets ``limit_s`` before ``conn`` is cut off. Returns only once
    ``work`` has ended (nothing else may use ``conn`` before)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        await _settle(task, conn, limit_s)
        raise


async def _settle(
    task: asyncio.Future, conn: psycopg.AsyncConnection, limit_s: float
) -> None:
    """Wait for the cancelled ``task`` to end; cut ``conn`` off after ``limit_s``,
    or at once if the caller is cancelled again meanwhile."""
    try:
        await asyncio.wait({task}, timeout=limit_s)
    finally:
        if not task.done():
            log.warning(
                "PostgreSQL did not end a cancelled statement within %.1f s; "
                "dropping its connection",
                limit_s,
            )
            cut_off(conn)
            await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: the caller's cancellation is what counts


def cut_off(conn: psycopg.AsyncConnection) -> None:
    """Shut ``conn``'s socket down without closing its descriptor (psycopg still
    waits on it): reads see its end at once, and the connection is broken."""
    try:
        fd = os.dup(conn.pgconn.socket)
    except (OSError, psycopg.Error):  # closed already
        return
    with socket.socket(fileno=fd) as sock:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected any more
            pass
