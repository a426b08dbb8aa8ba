"""One device's ``Track`` stream: send batches, count acks, reconnect and resume.

A :class:`DeviceSession` takes batches of fixes from a :class:`Feed` (a queue that a
replay clock or a simulator fills) and keeps at most ``window`` batches unacked.
When the stream breaks it reconnects with jittered exponential backoff (for as long
as ``RetryPolicy.give_up_s`` allows without a session), says hello with the first
unacked sequence number, drops every unacked fix the server reports as stored
(``SessionStarted.last_stored_seq``) and resends the rest, so that a resumed device
neither loses nor duplicates fixes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from tracking.v1 import common_pb2, event_pb2, track_pb2, track_pb2_grpc

log = logging.getLogger(__name__)

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)

# A server restart takes tens of seconds; a device rides it out and fails only when
# it has had no session for this long.
GIVE_UP_S = 120.0

Batch = Sequence[common_pb2.Fix]
Feed = asyncio.Queue  # of Batch, then None when the device has no more fixes


class StreamBroken(Exception):
    """The stream ended before every sent batch was acknowledged."""


class SessionFailed(Exception):
    """The device gave up: a non-retryable status or no session for too long."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Jittered exponential backoff between reconnects, bounded by time."""

    initial_s: float = 0.1
    max_s: float = 5.0
    multiplier: float = 2.0
    give_up_s: float = GIVE_UP_S  # failing without a session for this long

    def delay_s(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier**attempt)]."""
        ceiling = min(self.max_s, self.initial_s * self.multiplier**attempt)
        return random.uniform(0.0, ceiling)


class Backoff:
    """The waits of one caller's reconnects under a :class:`RetryPolicy`.

    Attempts are not counted against a limit: full jitter can spend ten of them in
    a few seconds. The caller gives up once it has been failing for ``give_up_s``,
    counted from the first failure after its last success.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self.attempts = 0
        self._failing_since: float | None = None

    def succeeded(self) -> None:
        """A session opened (or a response came): the next failure starts afresh."""
        self.attempts = 0
        self._failing_since = None

    def failing_s(self) -> float:
        if self._failing_since is None:
            return 0.0
        return time.monotonic() - self._failing_since

    def next_delay_s(self) -> float | None:
        """The wait before the next attempt, or None once it is time to give up."""
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        elif self.failing_s() >= self._policy.give_up_s:
            return None
        delay = self._policy.delay_s(self.attempts)
        self.attempts += 1
        return delay

    def gave_up(self, detail: str) -> str:
        return (
            f"gave up after {self.failing_s():.1f} s without a session "
            f"({self.attempts} attempts): {detail}"
        )


@dataclass(slots=True)
class SessionStats:
    """What happened to one device's fixes."""

    device: str
    sent: int = 0  # fixes written for the first time
    resent: int = 0  # fixes written again after a reconnect
    stored: int = 0  # fixes the server stored as new (from acks)
    duplicates: int = 0  # fixes the server already held (from acks)
    stored_before_ack: int = 0  # unacked fixes found stored when resuming
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    reconnects: int = 0
    events: int = 0
    last_stored_seq: int = 0
    error: str = ""

    @property
    def settled(self) -> int:
        """Fixes whose fate is known."""
        return (
            self.stored
            + self.duplicates
            + self.stored_before_ack
            + sum(self.rejected.values())
        )

    def count_rejections(
        self, answer: track_pb2.Ack | track_pb2.PublishBatchResponse
    ) -> None:
        """Count an answer's rejections by reason; those beyond the server's list
        (it lists the first 1,000) count as ``UNLISTED``."""
        for rejection in answer.rejections:
            self.rejected[track_pb2.RejectReason.Name(rejection.reason)] += 1
        unlisted = answer.rejected - len(answer.rejections)
        if unlisted > 0:
            self.rejected["UNLISTED"] += unlisted


class DeviceSession:
    """Streams one device's batches through ``Track`` until its feed is exhausted."""

    def __init__(
        self,
        stub: track_pb2_grpc.TrackSessionStub,
        device_id: str,
        feed: Feed,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        window: int = 8,
        retry: RetryPolicy | None = None,
        want_events: bool = False,
        on_event: Callable[[event_pb2.Event], None] | None = None,
        break_after_batches: int | None = None,
    ) -> None:
        self.stats = SessionStats(device_id)
        self._stub = stub
        self._device = device_id
        self._feed = feed
        self._metadata = tuple(metadata)
        self._window = max(1, window)
        self._retry = retry or RetryPolicy()
        self._want_events = want_events
        self._on_event = on_event
        # Fault injection for tests: break the first stream after this many batches.
        self._break_after = break_after_batches
        self._unacked: collections.deque[list[common_pb2.Fix]] = collections.deque()
        self._acked = asyncio.Event()
        self._feed_done = False
        self._started = False

    async def run(self) -> SessionStats:
        """Stream until every fix from the feed is settled; never raises on I/O."""
        backoff = Backoff(self._retry)
        while True:
            code: grpc.StatusCode | None = None
            try:
                await self._stream()
                return self.stats
            except grpc.aio.AioRpcError as exc:
                code, detail = exc.code(), exc.details()
            except (StreamBroken, asyncio.InvalidStateError) as exc:
                detail = str(exc)

            if code is not None and code not in RETRYABLE:
                self.stats.error = f"{code.name}: {detail}"
                log.debug("device %s: %s", self._device, self.stats.error)
                return self.stats
            if self._started:
                backoff.succeeded()
            delay_s = backoff.next_delay_s()
            if delay_s is None:
                self.stats.error = backoff.gave_up(detail)
                log.debug("device %s: %s", self._device, self.stats.error)
                return self.stats
            log.debug(
                "device %s: stream broke (%s), reconnecting", self._device, detail
            )
            self.stats.reconnects += 1
            await asyncio.sleep(delay_s)

    async def _stream(self) -> None:
        self._started = False
        call = self._stub.Track(metadata=self._metadata)
        tasks: list[asyncio.Task] = []
        try:
            await self._open(call)
            self._started = True
            tasks = [
                asyncio.create_task(self._read_acks(call)),
                asyncio.create_task(self._write_batches(call)),
            ]
            reader, writer = tasks
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # raises when the stream broke
            await writer  # every batch is acked once it returns
            await call.done_writing()
            await reader
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.cancel()

    async def _open(self, call: grpc.aio.StreamStreamCall) -> None:
        """Hello, then drop what the server already holds and resend the rest."""
        hello = track_pb2.Hello(device_id=self._device, want_events=self._want_events)
        if self._unacked:
            hello.resume_from_seq = self._unacked[0][0].seq
        await call.write(track_pb2.TrackRequest(hello=hello))
        response = await call.read()
        if response is grpc.aio.EOF or not response.HasField("started"):
            raise StreamBroken("no SessionStarted after hello")
        stored_seq = response.started.last_stored_seq
        self.stats.last_stored_seq = max(self.stats.last_stored_seq, stored_seq)

        resend = []
        for batch in self._unacked:
            kept = [fix for fix in batch if fix.seq > stored_seq]
            self.stats.stored_before_ack += len(batch) - len(kept)
            if kept:
                resend.append(kept)
        self._unacked = collections.deque(resend)
        for batch in resend:
            self.stats.resent += len(batch)
            await call.write(self._request(batch))

    async def _write_batches(self, call: grpc.aio.StreamStreamCall) -> None:
        written = 0
        while not self._feed_done:
            while len(self._unacked) >= self._window:
                self._acked.clear()
                await self._acked.wait()
            batch = await self._feed.get()
            if batch is None:
                self._feed_done = True
                break
            batch = list(batch)
            self._unacked.append(batch)
            self.stats.sent += len(batch)
            await call.write(self._request(batch))
            written += 1
            if self._break_after is not None and written >= self._break_after:
                self._break_after = None
                raise StreamBroken(f"stream broken on purpose after {written} batches")
        while self._unacked:
            self._acked.clear()
            await self._acked.wait()

    async def _read_acks(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                if self._unacked or not self._feed_done:
                    raise StreamBroken("server ended the stream with batches unacked")
                return
            kind = response.WhichOneof("message")
            if kind == "ack":
                self._settle(response.ack)
            elif kind == "event":
                self.stats.events += 1
                if self._on_event is not None:
                    self._on_event(response.event)

    def _settle(self, ack: track_pb2.Ack) -> None:
        if not self._unacked:
            log.warning("device %s: ack without a batch in flight", self._device)
            return
        self._unacked.popleft()
        self.stats.stored += ack.stored
        self.stats.duplicates += ack.duplicates
        self.stats.count_rejections(ack)
        self.stats.last_stored_seq = max(
            self.stats.last_stored_seq, ack.last_stored_seq
        )
        self._acked.set()

    @staticmethod
    def _request(batch: list[common_pb2.Fix]) -> track_pb2.TrackRequest:
        return track_pb2.TrackRequest(batch=track_pb2.FixBatch(fixes=batch))
