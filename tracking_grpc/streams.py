"""Responses of long-lived streams, written to clients that may stop reading.

A write returns once the client's HTTP/2 window has room for the response. A client
that stops reading (a frozen dashboard, a device app stuck in the background) would
block the write, and pin whatever its handler holds for it, for as long as its
connection lives. Every response of ``Track``, ``Watch`` and ``WatchEvents`` goes
through :func:`write`, which ends the stream when one response has waited
``write_timeout_s`` (:class:`~tracking_grpc.errors.FellBehind`, RESOURCE_EXHAUSTED)
or when the caller's token expires (UNAUTHENTICATED), blocked in a write or not.

The status of such a stream waits in gRPC behind the responses the client has not
read (the interceptor does not wait for it): a client that reads again gets them,
then the status.

Nearly every write is done within milliseconds, so the deadlines are kept without a
timer per write (an ``asyncio.timeout`` per response, and another for the token's
expiry, were a few per cent of the server's CPU at 2,000 acks a second): a write
registers its deadline with its event loop's :class:`_Writes`, whose sweep every
``SWEEP_S`` arms a timer only for the writes whose deadline comes before the next
sweep. The timer fires at the deadline, as ``asyncio.timeout``'s would.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from tracking_grpc.auth import EXPIRED, Caller
from tracking_grpc.errors import FellBehind, Unauthenticated

# What a stream that fell behind ends with; {s} is write_timeout_s.
WATCHER_BEHIND = "watcher fell behind: a response waited {s} s unread; watch again"
DEVICE_BEHIND = (
    "the device read no acks for {s} s; reconnect and resume from SessionStarted"
)
# How often the writes in progress are looked at; a write that ends before the
# next look never gets a timer.
SWEEP_S = 1.0


class _Write:
    """A write in progress: its task, when it must end, and why."""

    __slots__ = ("cancelling", "deadline", "expired", "expiry_first", "task", "timer")

    def __init__(self, task: asyncio.Task, deadline: float, expiry_first: bool) -> None:
        self.task = task
        self.deadline = deadline
        self.expiry_first = expiry_first  # the token expires before the timeout
        self.cancelling = task.cancelling()
        self.timer: asyncio.TimerHandle | None = None
        self.expired = False


class _Writes:
    """The writes in progress of one event loop, and their deadlines."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: set[_Write] = set()
        self.sweep_at = 0.0  # when the next sweep runs; 0: none is scheduled

    def start(self, task: asyncio.Task, timeout_s: float, caller: Caller) -> _Write:
        now = self.loop.time()
        deadline = now + timeout_s
        expiry_first = False
        if caller.expires_at is not None:
            expiry = now + (caller.expires_at - time.time())
            if expiry < deadline:
                deadline, expiry_first = expiry, True
        write = _Write(task, deadline, expiry_first)
        self.pending.add(write)
        if not self.sweep_at:
            self.sweep_at = now + SWEEP_S
            self.loop.call_at(self.sweep_at, self._sweep)
        if deadline <= self.sweep_at:
            write.timer = self.loop.call_at(deadline, self._expire, write)
        return write

    def end(self, write: _Write) -> bool:
        """Forget ``write``; whether its deadline cancelled its task."""
        self.pending.discard(write)
        if write.timer is not None:
            write.timer.cancel()
        return write.expired

    def _sweep(self) -> None:
        if not self.pending:
            self.sweep_at = 0.0
            return
        self.sweep_at = self.loop.time() + SWEEP_S
        self.loop.call_at(self.sweep_at, self._sweep)
        for write in self.pending:
            if write.timer is None and write.deadline <= self.sweep_at:
                write.timer = self.loop.call_at(write.deadline, self._expire, write)

    def _expire(self, write: _Write) -> None:
        if write in self.pending and not write.expired:
            write.expired = True
            write.task.cancel()


_last: _Writes | None = None


def _writes(loop: asyncio.AbstractEventLoop) -> _Writes:
    """The writes of ``loop``. A server runs one loop; when another one writes (in
    tests, or a loop of another thread), it gets a new :class:`_Writes`, and the
    writes started under the previous one end under it (each ends where it began)."""
    global _last
    writes = _last
    if writes is None or writes.loop is not loop:
        writes = _last = _Writes(loop)
    return writes


async def write(
    context: grpc.aio.ServicerContext,
    caller: Caller,
    response: Any,
    timeout_s: float,
    behind: str,
) -> None:
    """Write ``response``; raise FellBehind with ``behind`` (``{s}``: the timeout)
    when the client leaves it unread for ``timeout_s``, and UNAUTHENTICATED when
    the caller's token expires first (or has by the time the write is done)."""
    task = asyncio.current_task()
    assert task is not None
    writes = _writes(task.get_loop())
    pending = writes.start(task, timeout_s, caller)
    try:
        await context.write(response)
    except asyncio.CancelledError:
        # As asyncio.timeout: the deadline's cancellation, unless another came too.
        if writes.end(pending) and task.uncancel() <= pending.cancelling:
            if pending.expiry_first:
                raise Unauthenticated(EXPIRED) from None
            raise FellBehind(behind.format(s=f"{timeout_s:g}")) from None
        raise
    except BaseException:
        if writes.end(pending):
            task.uncancel()
        raise
    if writes.end(pending):
        task.uncancel()
    caller.check_not_expired()  # what was ready at once still goes out in time
