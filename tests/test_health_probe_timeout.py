"""A dependency that stops answering is reported within the check timeout.

psycopg, interrupted in a query, cancels it on the server and waits for it to end
(up to 5 s, then 5 s more): a health probe that waited for its ping to finish
cancelling said NOT_SERVING 13 s after a frozen PostgreSQL (SIGSTOP) stopped
answering, instead of ``CHECK_TIMEOUT_S`` (3 s).
"""

from __future__ import annotations

import asyncio
import time

from tracking_grpc import server
from tracking_grpc.errors import Unavailable


class SlowToCancel:
    """A ping that hangs, and once cancelled takes a while to give up (as psycopg's
    cancellation of a query on a server that does not answer)."""

    def __init__(self) -> None:
        self.gave_up = asyncio.Event()

    async def ping(self) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(2)
            self.gave_up.set()
            raise


class Down:
    async def ping(self) -> None:
        raise Unavailable("down (test)")


class Up:
    async def ping(self) -> None:
        return None


async def test_a_hung_dependency_is_down_within_the_check_timeout(monkeypatch) -> None:
    monkeypatch.setattr(server, "CHECK_TIMEOUT_S", 0.2)
    store = SlowToCancel()
    started = time.monotonic()
    assert await server._answers(store) is False
    assert time.monotonic() - started < 1.5  # not the 2 s of the late cancel
    await asyncio.wait_for(store.gave_up.wait(), 5)  # the late ping still ends


async def test_answers_up_and_down() -> None:
    assert await server._answers(Up()) is True
    assert await server._answers(Down()) is False
