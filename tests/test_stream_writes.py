"""streams.write on its own: a response left unread ends the stream at its deadline,
whether the deadline came before the first sweep (a timer at once) or after it (a
timer armed by a sweep); the token's expiry ends it first when it comes first;
writes done in time leave no timer behind; other cancellations stay cancellations.
The servers in test_slow_readers.py check the same through gRPC."""

from __future__ import annotations

import asyncio
import time

import pytest

from tracking_grpc import streams
from tracking_grpc.auth import Caller, Role
from tracking_grpc.errors import FellBehind, Unauthenticated

CALLER = Caller("t", "s", Role.ADMIN)
SLACK_S = 0.15  # a timer may fire this late on a busy machine


class Context:
    """A ServicerContext whose writes wait until ``release`` is set."""

    def __init__(self, blocked: bool = True) -> None:
        self.release = asyncio.Event()
        if not blocked:
            self.release.set()
        self.written: list[object] = []

    async def write(self, response: object) -> None:
        await self.release.wait()
        self.written.append(response)


async def timed_write(
    context: Context, timeout_s: float, caller: Caller = CALLER
) -> float:
    started = time.monotonic()
    behind = streams.DEVICE_BEHIND
    await streams.write(context, caller, "r", timeout_s, behind)  # type: ignore
    return time.monotonic() - started


def pending_writes() -> set:
    return streams._writes(asyncio.get_running_loop()).pending


async def test_a_blocked_write_ends_at_a_deadline_before_the_first_sweep() -> None:
    started = time.monotonic()
    with pytest.raises(FellBehind, match=r"read no acks for 0\.3 s"):
        await timed_write(Context(), 0.3)
    assert 0.3 <= time.monotonic() - started < 0.3 + SLACK_S
    assert not pending_writes()


async def test_a_blocked_write_ends_at_a_deadline_a_sweep_armed(monkeypatch) -> None:
    monkeypatch.setattr(streams, "SWEEP_S", 0.1)
    await timed_write(Context(blocked=False), 1.0)  # a sweep that finds nothing
    started = time.monotonic()
    with pytest.raises(FellBehind):
        await timed_write(Context(), 0.45)  # three sweeps before its deadline
    assert 0.45 <= time.monotonic() - started < 0.45 + SLACK_S
    assert not pending_writes()


async def test_writes_done_in_time_leave_no_timer_and_the_task_uncancelled() -> None:
    context = Context(blocked=False)
    for _ in range(100):
        await timed_write(context, 30.0)
    assert len(context.written) == 100
    assert not pending_writes()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_the_token_expiring_first_ends_a_blocked_write_unauthenticated() -> None:
    caller = Caller("t", "s", Role.DEVICE, expires_at=time.time() + 0.3)
    started = time.monotonic()
    with pytest.raises(Unauthenticated):
        await timed_write(Context(), 5.0, caller)
    assert 0.25 <= time.monotonic() - started < 0.3 + SLACK_S


async def test_a_token_expired_by_the_end_of_the_write_ends_it_too() -> None:
    caller = Caller("t", "s", Role.DEVICE, expires_at=time.time() - 1)
    with pytest.raises(Unauthenticated):
        await timed_write(Context(blocked=False), 5.0, caller)


async def test_the_timeout_expiring_first_is_fell_behind_for_a_token_caller() -> None:
    caller = Caller("t", "s", Role.DEVICE, expires_at=time.time() + 60)
    with pytest.raises(FellBehind):
        await timed_write(Context(), 0.2, caller)


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    task = asyncio.create_task(timed_write(Context(), 0.3))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.4)  # past the deadline: nothing fires at a gone write
    assert not pending_writes()


async def test_a_cancellation_at_the_deadline_too_stays_a_cancellation() -> None:
    context = Context()
    task = asyncio.create_task(timed_write(context, 0.2))
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    # The outside cancel is due at the deadline itself, so both land in the same
    # loop iteration however late the loop runs (0.1 s later on a busy machine
    # could fall one iteration after the deadline's: CI once saw FellBehind).
    [write] = pending_writes()
    loop.call_at(write.deadline, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
