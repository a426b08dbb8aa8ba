"""Watchers of live positions, with coalescing so a slow watcher never slows ingest.

Each watcher holds at most one pending position per device: a newer update replaces
an older one that has not been sent yet. Delivery is pulled by the watcher's own
stream task, so ingest only ever touches a small dict per watcher. What a watcher was
sent (the newest fix time and seq per device) is two arrays indexed by a row number
per device that the tenant's watchers share (:class:`DeviceRows`): 16 bytes per
device and watcher, where a dict of tuples took 130 (3 MB per whole-tenant watcher
at 24,000 devices).

After an outage (live updates skipped while Redis was down, or published while this
process's subscription was lost) the hub offers every watcher the live store's
positions again (:meth:`WatchHub.catch_up`); each gets only what is newer than it
was sent.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.core.geodesy import in_box, in_circle
from tracking_grpc.core.precision import snap
from tracking_grpc.errors import ResourceExhausted
from tracking_grpc.interest import TenantInterest, summarise
from tracking_grpc.observability import metrics
from tracking_grpc.storage.base import Broker, LiveStore

log = logging.getLogger(__name__)

NEVER_SENT = np.iinfo(np.int64).min  # fix time of a device a watcher was not sent


class DeviceRows:
    """Row numbers of one tenant's devices, shared by the tenant's watchers while
    any is open (:meth:`of`)."""

    def __init__(self) -> None:
        self._row: dict[str, int] = {}

    @classmethod
    def of(cls, tenant: str) -> DeviceRows:
        rows = _shared_rows.get(tenant)
        if rows is None:
            rows = _shared_rows[tenant] = cls()
        return rows

    def __len__(self) -> int:
        return len(self._row)

    def rows(self, devices: Sequence[str]) -> np.ndarray:
        """The row of each device, numbering devices seen for the first time."""
        row = self._row
        numbers = [row.get(device, -1) for device in devices]
        for i, number in enumerate(numbers):
            if number < 0:
                numbers[i] = row.setdefault(devices[i], len(row))
        return np.array(numbers, dtype=np.intp)


_shared_rows: weakref.WeakValueDictionary[str, DeviceRows]
_shared_rows = weakref.WeakValueDictionary()


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """Which positions a watcher wants: devices, and optionally an area, which a
    watcher limited to ``precision_m`` matches against coarse positions (so that
    a small area tells it nothing finer than the grid)."""

    devices: frozenset[str] = frozenset()
    box: tuple[float, float, float, float] | None = None  # south, west, north, east
    circle: tuple[float, float, float] | None = None  # lat, lon, radius_m
    precision_m: float = 0.0

    def mask(self, batch: FixBatch) -> np.ndarray:
        keep = np.ones(len(batch), dtype=bool)
        if self.devices:
            keep &= np.isin(batch.device.astype(str), list(self.devices))
        if self.box is None and self.circle is None:
            return keep
        lat, lon = batch.lat, batch.lon
        if self.precision_m > 0:
            lat, lon, _ = snap(lat, lon, self.precision_m)
        if self.box is not None:
            keep &= in_box(lat, lon, *self.box)
        if self.circle is not None:
            keep &= in_circle(lat, lon, *self.circle)
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
        # Newest (time_ms, seq) sent per device row of self._devices.
        self._devices = DeviceRows.of(tenant)
        self._sent_time = np.empty(0, dtype=np.int64)
        self._sent_seq = np.empty(0, dtype=np.uint64)
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
            if not pending:
                continue
            entries = list(pending.values())
            times = np.fromiter((e[0] for e in entries), np.int64, len(entries))
            seqs = np.fromiter((e[1] for e in entries), np.uint64, len(entries))
            newer = self._record_sent(list(pending), times, seqs)
            fresh = [entries[i] for i in np.flatnonzero(newer).tolist()]
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
        order = np.lexsort((batch.seq, batch.time_ms))  # the newest of a device last
        devices = batch.device[order].tolist()
        self._record_sent(devices, batch.time_ms[order], batch.seq[order])

    def _record_sent(
        self, devices: Sequence[str], times: np.ndarray, seqs: np.ndarray
    ) -> np.ndarray:
        """Which positions are newer than the device was sent; those are recorded
        as sent (for a device given twice, the later one)."""
        rows = self._devices.rows(devices)
        if len(self._sent_time) < len(self._devices):
            grow = max(len(self._devices), 2 * len(self._sent_time)) - len(
                self._sent_time
            )
            self._sent_time = np.concatenate(
                [self._sent_time, np.full(grow, NEVER_SENT, dtype=np.int64)]
            )
            self._sent_seq = np.concatenate(
                [self._sent_seq, np.zeros(grow, dtype=np.uint64)]
            )
        sent_time, sent_seq = self._sent_time[rows], self._sent_seq[rows]
        newer = (times > sent_time) | ((times == sent_time) & (seqs > sent_seq))
        self._sent_time[rows[newer]] = times[newer]
        self._sent_seq[rows[newer]] = seqs[newer]
        return newer


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
        self._added = 0  # watchers ever added (see offer_early)
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
        self._added += 1
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
        self._offer(updates)

    def offer_early(self, updates: FixBatch) -> int:
        """Offer newly stored positions to this process's watchers before their
        live write (a round trip to Redis) instead of after it; returns a mark
        for :meth:`added_since`.

        Each watcher takes only what is newer than it was sent, so a position
        another process has since overtaken is dropped or replaced, never sent
        after the newer one. A watcher added meanwhile may read its snapshot
        before the live write lands: the publisher then delivers the updates
        once more after the write (see ``added_since``), so it misses nothing."""
        self._offer(updates)
        return self._added

    def added_since(self, mark: int) -> bool:
        """Whether a watcher was added after ``offer_early`` returned ``mark``."""
        return self._added != mark

    def _offer(self, updates: FixBatch) -> None:
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
