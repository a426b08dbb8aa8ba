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
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from tracking_grpc.auth import Caller
from tracking_grpc.errors import FellBehind

# What a stream that fell behind ends with; {s} is write_timeout_s.
WATCHER_BEHIND = "watcher fell behind: a response waited {s} s unread; watch again"
DEVICE_BEHIND = (
    "the device read no acks for {s} s; reconnect and resume from SessionStarted"
)


async def write(
    context: grpc.aio.ServicerContext,
    caller: Caller,
    response: Any,
    timeout_s: float,
    behind: str,
) -> None:
    """Write ``response``; raise FellBehind with ``behind`` (``{s}``: the timeout)
    when the client leaves it unread for ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s) as timer:
            await caller.before_expiry(context.write(response))
    except TimeoutError:
        if timer.expired():
            raise FellBehind(behind.format(s=f"{timeout_s:g}")) from None
        raise
