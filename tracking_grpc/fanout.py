"""Watchers of live positions, with coalescing so a slow watcher never slows ingest.

Each watcher holds at most one pending position per device: a newer update replaces
an older one that has not been sent yet. Delivery is pulled by the watcher's own
stream task, so ingest only ever touches a small dict per watcher.

After an outage (live updates skipped while Redis was down, or published while this
process's subscription was lost) the hub offers every watcher the live store's
positions again (:meth:`WatchHub.catch_up`); each gets only what is newer than it
was sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.core.geodesy import in_box, in_circle
from tracking_grpc.errors import ResourceExhausted
from tracking_grpc.interest import TenantInterest, summarise
from tracking_grpc.observability import metrics
from tracking_grpc.storage.base import Broker, LiveStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which positions a watcher wants: devices, and optionally an area."""

    devices: frozenset[str] = frozenset()
    box: tuple[float, float, float, float] | None = None  # south, west, north, east
    circle: tuple[float, float, float] | None = None  # lat, lon, radius_m

    def mask(self, batch: FixBatch) -> np.ndarray:
        keep = np.ones(len(batch), dtype=bool)
        if self.devices:
            keep &= np.isin(batch.device.astype(str), list(self.devices))
        if self.box is not None:
            keep &= in_box(batch.lat, batch.lon, *self.box)
        if self.circle is not None:
            keep &= in_circle(batch.lat, batch.lon, *self.circle)
        return keep


class Watcher:
    """One watch stream: a filter and the newest unsent position per device.

    ``since_ms``: a watcher that skipped the snapshot wants positions the server
    received from then on (server time, milliseconds); 0 for one that took it.
    """

    def __init__(
        self, tenant: str, watch_filter: WatchFilter, since_ms: int = 0
    ) -> None:
        self.tenant = tenant
        self.filter = watch_filter
        self.since_ms = since_ms
        self._pending: dict[str, tuple[int, int, FixBatch, int]] = {}
        self._sent_time: dict[str, tuple[int, int]] = {}
        self._ready = asyncio.Event()
        self.coalesced = 0

    def offer(self, batch: FixBatch) -> None:
        """Queue the matching rows, replacing older unsent rows of the same device."""
        rows = np.flatnonzero(self.filter.mask(batch))
        if rows.size == 0:
            return
        coalesced = self.coalesced
        devices = batch.device[rows].tolist()
        times = batch.time_ms[rows].tolist()
        seqs = batch.seq[rows].tolist()
        for device, t, s, row in zip(devices, times, seqs, rows.tolist(), strict=True):
            old = self._pending.get(device)
            if old is not None:
                if (old[0], old[1]) >= (t, s):
                    continue
                self.coalesced += 1
            self._pending[device] = (t, s, batch, row)
        metrics.watch_updates("coalesced", self.coalesced - coalesced)
        self._ready.set()

    async def next_updates(self) -> FixBatch:
        """Wait for and take every pending position, oldest fix first."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            pending, self._pending = self._pending, {}
            fresh = []
            for device, (t, s, batch, row) in pending.items():
                if self._sent_time.get(device, (-(2**63), 0)) >= (t, s):
                    continue
                self._sent_time[device] = (t, s)
                fresh.append((t, s, batch, row))
            metrics.watch_updates("dropped", len(pending) - len(fresh))
            if fresh:
                metrics.watch_updates("sent", len(fresh))
                # One take per source batch (usually one commit), then one sort.
                rows_of: dict[int, tuple[FixBatch, list[int]]] = {}
                for _, _, batch, row in fresh:
                    rows_of.setdefault(id(batch), (batch, []))[1].append(row)
                joined = FixBatch.concat(
                    [batch.take(np.array(rows)) for batch, rows in rows_of.values()]
                )
                return joined.take(np.lexsort((joined.seq, joined.time_ms)))

    def catch_up(self, positions: FixBatch) -> None:
        """Offer live positions after an outage: those newer than this watcher was
        sent reach it, if received since it opened when it skipped the snapshot."""
        if self.since_ms:
            positions = positions.take(positions.received_ms >= self.since_ms)
        self.offer(positions)

    def mark_sent(self, batch: FixBatch) -> None:
        """Remember snapshot rows so that older queued updates are not sent after."""
        for device, t, s in zip(
            batch.device.tolist(),
            batch.time_ms.tolist(),
            batch.seq.tolist(),
            strict=True,
        ):
            if self._sent_time.get(device, (-(2**63), 0)) < (t, s):
                self._sent_time[device] = (t, s)


class WatchHub:
    """Every watcher of this process, fed by the broker, which learns from the hub
    which updates this process wants (its interest)."""

    def __init__(
        self, broker: Broker, live: LiveStore, max_watchers: int = 1_000
    ) -> None:
        self.broker = broker
        self.live = live
        self.max_watchers = max_watchers
        self._watchers: dict[str, set[Watcher]] = {}
        self._count = 0
        self._shrinking: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.broker.subscribe(self.deliver, self.interest, self.catch_up)

    async def add(self, watcher: Watcher) -> None:
        """Add a watcher; returns once every update whose live write starts later
        will reach it (the broker routes by the grown interest), so a snapshot
        read after this misses nothing. Unavailable if the broker cannot say so;
        ResourceExhausted when this process already has ``max_watchers``."""
        if self._count >= self.max_watchers:
            raise ResourceExhausted(
                f"this server has {self.max_watchers} open watches (max_watchers); "
                "retry later"
            )
        self._watchers.setdefault(watcher.tenant, set()).add(watcher)
        self._count += 1
        metrics.watcher_opened()
        try:
            await self.broker.interest_changed()
        except BaseException:
            self.remove(watcher)
            raise

    def remove(self, watcher: Watcher) -> None:
        """Remove a watcher; the interest shrinks in the background."""
        watchers = self._watchers.get(watcher.tenant)
        if watchers is not None and watcher in watchers:
            metrics.watcher_closed()
            watchers.discard(watcher)
            self._count -= 1
            if not watchers:
                del self._watchers[watcher.tenant]
            task = asyncio.create_task(self.broker.interest_changed())
            self._shrinking.add(task)
            task.add_done_callback(self._shrunk)

    def _shrunk(self, task: asyncio.Task) -> None:
        self._shrinking.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("shrinking the watch interest failed: %s", task.exception())

    def interest(self) -> dict[str, TenantInterest]:
        """The union of the watchers' filters, per tenant."""
        return {
            tenant: summarise(w.filter for w in watchers)
            for tenant, watchers in self._watchers.items()
        }

    @property
    def count(self) -> int:
        return self._count

    async def deliver(self, updates: FixBatch) -> None:
        """Broker handler: offer new live positions to the tenant's watchers."""
        for watcher in list(self._watchers.get(updates.tenant, ())):
            watcher.offer(updates)

    async def catch_up(self) -> None:
        """Offer every watcher its tenant's positions from the live store: after an
        outage they hold what the watchers missed (called by the broker once its
        lost subscription is back, and by the live repairer after a rebuild)."""
        tenants = list(self._watchers)
        for tenant in tenants:
            positions = await self.live.snapshot(tenant)
            for watcher in self.watchers_of(tenant):
                watcher.catch_up(positions)
        if tenants:
            log.info("watchers of %d tenants caught up", len(tenants))

    def watchers_of(self, tenant: str) -> Sequence[Watcher]:
        return list(self._watchers.get(tenant, ()))
