"""A simulated watcher: a Watch stream that comes back when it ends.

The age of each live update is its latency. The first stream skips the snapshot
(only live updates are measured). When a stream ends (UNAVAILABLE: its server
process died or Redis restarted; CANCELLED: the storm closed the channel) the
watcher opens another, after the client's jittered back-off (0.1 s doubling to 5 s,
:mod:`tracking_grpc.client.session`) or at its moment of the storm, and asks for a
snapshot first, as a real watcher does to catch up. It reports its reconnects and
the longest gaps without a live update (:class:`Gaps`) as a :class:`WatcherReport`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc
from tracking.v1 import track_pb2

from tracking_grpc.client.session import RETRYABLE, Backoff, RetryPolicy
from tracking_grpc.loadgen.channels import ChannelPool, sleep_until
from tracking_grpc.loadgen.plan import DriverResult, Plan, WatcherReport, Window

log = logging.getLogger(__name__)

CLOSED = "closed"  # the server ended the stream with OK


class Gaps:
    """The longest times without a live update inside the steady window, for the
    watcher and for each device. The window's edges count: a device not heard at
    all in the window was silent for the whole of it."""

    def __init__(self, window: Window, device_ids: Sequence[str]) -> None:
        self.start_s = window.steady_start_s
        self.end_s = window.end_s
        self.watched = len(device_ids) or None  # None: the whole tenant
        self.last_s = self.start_s
        self.longest_s = 0.0
        # device -> [last heard in the window (or its start), longest gap so far]
        self.devices = {device: [self.start_s, 0.0] for device in device_ids}
        self.updated: set[str] = set()  # heard in the window
        self.on_stream: set[str] = set()  # heard on the current stream

    def new_stream(self) -> None:
        self.on_stream = set()

    def heard(self, now_s: float, devices: list[str]) -> None:
        """Live updates of ``devices`` arrived at ``now_s``."""
        self.on_stream.update(devices)
        if not self.start_s <= now_s < self.end_s:
            for device in devices:
                self.devices.setdefault(device, [self.start_s, 0.0])
            return
        self.longest_s = max(self.longest_s, now_s - self.last_s)
        self.last_s = now_s
        self.updated.update(devices)
        for device in devices:
            entry = self.devices.setdefault(device, [self.start_s, 0.0])
            entry[1] = max(entry[1], now_s - entry[0])
            entry[0] = now_s

    def longest_device_gap_s(self) -> float:
        if not self.devices:
            return self.end_s - self.start_s
        return max(max(gap, self.end_s - last) for last, gap in self.devices.values())

    def report(self, reconnects: int, reconnected_s: list[float]) -> WatcherReport:
        return WatcherReport(
            reconnects=reconnects,
            reconnected_s=reconnected_s,
            longest_gap_s=max(self.longest_s, self.end_s - self.last_s),
            longest_device_gap_s=self.longest_device_gap_s(),
            devices_watched=self.watched,
            devices_updated=len(self.updated),
            devices_updated_on_last_stream=len(self.on_stream),
        )


class Watcher:
    """One watcher: its streams, one at a time, and what it measured."""

    def __init__(
        self, slot: int, plan: Plan, result: DriverResult, device_ids: list[str]
    ) -> None:
        self.slot = slot
        self.plan = plan
        self.result = result
        self.device_ids = device_ids
        self.gaps = Gaps(plan.window, device_ids)
        self.backoff = Backoff(RetryPolicy())
        self.streams = 0
        self.dropped = False  # set by the storm: the drop is expected
        self.reconnect_at_s = 0.0
        self.outage_since_s: float | None = None  # a stream ended, none back yet
        self.reconnected_s: list[float] = []

    async def run(self, pool: ChannelPool) -> None:
        """Watch until cancelled (or a stream ends in a way retrying cannot mend)."""
        try:
            while await self._follow(pool):
                pass
        finally:
            report = self.gaps.report(len(self.reconnected_s), self.reconnected_s)
            self.result.watchers.append(report)

    async def _follow(self, pool: ChannelPool) -> bool:
        """One stream to its end, then the wait before the next; False: stop."""
        outcome, detail = await self._stream(pool)
        if self.outage_since_s is None:
            self.outage_since_s = time.time()
        if self.dropped:
            self.dropped = False
            self.result.count("watch_streams_dropped")
            await sleep_until(self.reconnect_at_s)
            return True
        name = outcome if isinstance(outcome, str) else outcome.name
        self.result.error(f"watch_{name}", detail=detail)
        if outcome != CLOSED and outcome not in RETRYABLE:
            return False
        delay_s = self.backoff.next_delay_s()
        if delay_s is None:
            self.result.error("watch_gave_up", detail=self.backoff.gave_up(detail))
            return False
        await asyncio.sleep(delay_s)
        return True

    async def _stream(self, pool: ChannelPool) -> tuple[grpc.StatusCode | str, str]:
        """Read one stream until it ends; how it ended, and the server's detail."""
        request = track_pb2.WatchRequest(
            device_ids=self.device_ids, skip_snapshot=self.streams == 0
        )
        self.streams += 1
        self.gaps.new_stream()
        call = pool.stub(self.slot).Watch(request, metadata=pool.metadata)
        try:
            async for response in call:
                self._on_response(response)
            return CLOSED, ""
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        except asyncio.CancelledError:
            # A closed channel cancels its calls; our own cancellation goes on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return grpc.StatusCode.CANCELLED, "channel closed"
        finally:
            call.cancel()

    def _on_response(self, response: track_pb2.WatchResponse) -> None:
        if response.snapshot:
            self.result.count("watch_snapshot_positions", len(response.positions))
            if response.snapshot_done:
                self._back()
            return
        now_ns = time.time_ns()
        now_ms = now_ns / 1e6
        counts = self.plan.window.counts
        times = [p.time_ms for p in response.positions]
        self.result.watch_ms.extend(now_ms - t for t in times if counts(t))
        self.result.count("watch_positions", len(times))
        self.result.count("watch_messages")
        self.gaps.heard(now_ns / 1e9, [p.device_id for p in response.positions])

    def _back(self) -> None:
        """A new stream has its snapshot: the watcher is up to date again."""
        self.backoff.succeeded()
        if self.outage_since_s is not None:
            self.reconnected_s.append(time.time() - self.outage_since_s)
            self.outage_since_s = None
            self.result.count("watch_reconnects")
