"""A simulated device: one Track stream, fixes on an open-loop schedule, resume.

The device produces a fix every ``interval`` on a fixed grid of whole milliseconds,
whether or not it is connected, and keeps each fix until an ack covers it. The fix
time is the scheduled time, so a watcher can tell how old an update is. On a drop it
reconnects with ``resume_from_seq``, discards what the server says it holds, and
sends the rest in one batch, as a real device would after a tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque

import grpc
from tracking.v1 import common_pb2, track_pb2

from tracking_grpc.loadgen.channels import ChannelPool, sleep_until
from tracking_grpc.loadgen.plan import DriverResult, Plan

RETRIES = 5


class NoSession(Exception):
    """The server answered a hello with something other than SessionStarted."""


class _Pending:
    __slots__ = ("fix", "sched_ms", "sends", "sent_ns")

    def __init__(self, fix: common_pb2.Fix, sched_ms: int) -> None:
        self.fix = fix
        self.sched_ms = sched_ms
        self.sent_ns = 0
        self.sends = 0


class Device:
    """One device and its stream."""

    def __init__(
        self,
        device_id: str,
        slot: int,
        plan: Plan,
        result: DriverResult,
        rng: random.Random,
        open_at_s: float,
    ) -> None:
        self.device_id = device_id
        self.slot = slot
        self.plan = plan
        self.result = result
        self.open_at_s = open_at_s
        interval_ms = round(plan.device_interval_s * 1000)
        self.interval_ms = interval_ms
        self.next_ms = round(open_at_s * 1000) + rng.randrange(max(1, interval_ms))
        self.lat = plan.center[0] + rng.uniform(-plan.spread_deg, plan.spread_deg)
        self.lon = plan.center[1] + rng.uniform(-plan.spread_deg, plan.spread_deg)
        self.rng = rng
        self.seq = 0
        self.acked_seq = 0
        self.unacked: deque[_Pending] = deque()
        self.written_seq = 0
        self.call: grpc.aio.StreamStreamCall | None = None
        self.writing = False
        self.dropped = False  # set by the storm: the drop is expected
        self.reconnect_at_s = 0.0
        self.recover_seq = 0  # after a reconnect: acked past this means recovered
        self.generating = True
        self.drained = asyncio.Event()  # set whenever nothing waits for an ack

    @property
    def connected(self) -> bool:
        return self.call is not None

    async def run(self, pool: ChannelPool) -> None:
        await sleep_until(self.open_at_s)
        connection = asyncio.create_task(self._connect_loop(pool))
        try:
            await self._generate()
            if self.unacked and not connection.done():
                self.drained.clear()
                drained = asyncio.create_task(self.drained.wait())
                await asyncio.wait({drained, connection}, timeout=10.0)
                drained.cancel()
        finally:
            self.generating = False
            call = self.call
            if call is not None and not connection.done():
                try:
                    await call.done_writing()
                    await asyncio.wait_for(asyncio.shield(connection), 5.0)
                except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError):
                    pass
            self.result.generated.append((self.device_id, self.seq, self.acked_seq))
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connection

    async def _generate(self) -> None:
        end_ms = self.plan.window.end_s * 1000
        while self.next_ms < end_ms:
            await sleep_until(self.next_ms / 1000)
            self.seq += 1
            self.lat += self.rng.gauss(0, 1e-4)
            self.lon += self.rng.gauss(0, 1e-4)
            fix = common_pb2.Fix(
                seq=self.seq,
                time_ms=self.next_ms,
                lat=self.lat,
                lon=self.lon,
                accuracy_m=5.0,
                provider=common_pb2.PROVIDER_GNSS,
            )
            self.unacked.append(_Pending(fix, self.next_ms))
            self.result.count("fixes_generated")
            await self._flush()
            self.next_ms += self.interval_ms
        # Streams stay open past the window's end: thousands of streams closing in
        # its last interval, or at its end, would load the server while it still
        # acks fixes of the steady state it measures.
        await sleep_until(self.plan.window.close_s)

    async def _flush(self) -> None:
        """Write every fix not yet written on this stream; one writer at a time."""
        if self.writing or self.call is None:
            return
        self.writing = True
        call = self.call
        try:
            while True:
                batch = [p for p in self.unacked if p.fix.seq > self.written_seq]
                if not batch:
                    return
                now_ns = time.time_ns()
                for pending in batch:
                    if pending.sends == 0:
                        pending.sent_ns = now_ns
                        if self.plan.window.counts(pending.sched_ms):
                            lag = now_ns / 1e6 - pending.sched_ms
                            self.result.send_lag_ms.append(lag)
                    pending.sends += 1
                self.written_seq = batch[-1].fix.seq
                message = track_pb2.FixBatch(fixes=[p.fix for p in batch])
                await call.write(track_pb2.TrackRequest(batch=message))
                self.result.count("messages_sent")
                self.result.count("fixes_sent", len(batch))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the read side sees the broken stream and reconnects
        finally:
            self.writing = False

    def _on_ack(self, ack: track_pb2.Ack) -> None:
        now_ns = time.time_ns()
        result = self.result
        if ack.rejected:  # all of them; at most 1,000 are listed
            result.error("rejected_fixes", ack.rejected)
        top = max([ack.acked_seq, *(r.seq for r in ack.rejections)])
        self.acked_seq = max(self.acked_seq, ack.acked_seq)
        result.count("fixes_stored", ack.stored)
        result.count("fixes_duplicate", ack.duplicates)
        counts = self.plan.window.counts
        while self.unacked and self.unacked[0].fix.seq <= top:
            pending = self.unacked.popleft()
            if pending.sends == 1 and counts(pending.sched_ms):
                result.ack_ms.append((now_ns - pending.sent_ns) / 1e6)
                result.ack_sched_ms.append(now_ns / 1e6 - pending.sched_ms)
        if not self.unacked:
            self.drained.set()
        if self.recover_seq and self.acked_seq >= self.recover_seq:
            storm = self.plan.storm
            assert storm is not None
            result.recovered_s.append(now_ns / 1e9 - storm.drop_s)
            self.recover_seq = 0

    async def _connect_loop(self, pool: ChannelPool) -> None:
        failures = 0  # in a row: a stream that got an ack starts the count again
        while True:
            detail = ""
            acked_before = self.acked_seq
            call = pool.stub(self.slot).Track(metadata=pool.metadata)
            try:
                await self._open(call)
                await self._read_acks(call)
                outcome = "closed"
            except grpc.aio.AioRpcError as exc:
                outcome, detail = exc.code().name, exc.details() or ""
            except NoSession:
                outcome = "NO_SESSION"
            except asyncio.CancelledError:
                # A closed channel cancels its calls; our own cancellation goes on.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                outcome = "CANCELLED"
            self.call = None
            if self.dropped:
                self.dropped = False
                self.result.count("streams_dropped")
                await sleep_until(self.reconnect_at_s)
                self.recover_seq = max(self.seq, 1)
                continue
            if not self.generating:
                return  # the server closed the stream after our done_writing
            self.result.error(f"track_{outcome}", detail=detail)
            failures = 1 if self.acked_seq > acked_before else failures + 1
            if failures > RETRIES:
                return
            await asyncio.sleep(0.5 * failures)

    async def _read_acks(self, call: grpc.aio.StreamStreamCall) -> None:
        while (response := await call.read()) is not grpc.aio.EOF:
            kind = response.WhichOneof("message")
            if kind == "ack":
                self._on_ack(response.ack)
            elif kind == "event":
                self.result.count("events")

    async def _open(self, call: grpc.aio.StreamStreamCall) -> None:
        hello = track_pb2.Hello(
            device_id=self.device_id, want_events=self.plan.want_events
        )
        if self.seq:
            hello.resume_from_seq = self.acked_seq + 1
        await call.write(track_pb2.TrackRequest(hello=hello))
        response = await call.read()
        if response is grpc.aio.EOF or response.WhichOneof("message") != "started":
            raise NoSession(self.device_id)
        stored = response.started.last_stored_seq
        if stored > self.seq:  # fixes of another run: ours would be taken as resent
            detail = _in_use(self.device_id, stored)
            self.result.error("device_id_in_use", detail=detail)
        if self.recover_seq:
            storm = self.plan.storm
            assert storm is not None
            self.result.reconnected_s.append(time.time() - storm.drop_s)
            self.result.count("streams_resumed")
        self.acked_seq = max(self.acked_seq, stored)
        while self.unacked and self.unacked[0].fix.seq <= stored:
            self.unacked.popleft()
            self.result.count("fixes_acked_by_resume")
        self.written_seq = stored
        self.call = call
        self.result.count("streams_opened")
        await self._flush()
        if self.recover_seq and not self.unacked:
            storm = self.plan.storm
            assert storm is not None
            self.result.recovered_s.append(time.time() - storm.drop_s)
            self.recover_seq = 0


def _in_use(device: str, stored: int) -> str:
    return (
        f"the server holds {device} up to seq {stored}, beyond this run's: a run "
        "tag of an earlier run? (bench/load.py --run-tag)"
    )
