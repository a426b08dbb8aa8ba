"""The geofence FixProcessor: newly stored fixes in, ENTER/EXIT/DWELL/CROSS out.

Each tenant's fences are compiled once into a :class:`FenceIndex` and rebuilt (in a
worker thread, reusing every unchanged fence) when the repository's revision moves;
the revision is checked at most every ``refresh_s`` seconds, and at once after a
change made through this process. Every second the ingest pipeline's ``tick`` raises
the DWELL events of devices silent inside a fence (rule in dwell.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import Unavailable
from tracking_grpc.events import TrackingEvent
from tracking_grpc.geofence.detector import EXIT_MARGIN_M, FenceDetector
from tracking_grpc.geofence.index import CompiledFence, FenceIndex, compile_usable
from tracking_grpc.geofence.model import FenceSpec
from tracking_grpc.storage.fences import EventRepository, FenceRepository

log = logging.getLogger(__name__)

INLINE_FIXES = 500  # larger batches are evaluated in a worker thread


@dataclass(frozen=True, slots=True)
class FenceCheck:
    """Where a position lies with respect to one fence (see CheckResponse)."""

    fence_id: str
    inside: bool
    certain: bool  # the whole accuracy circle is inside
    edge_distance_m: float  # negative inside
    enters: bool


@dataclass(slots=True)
class _Loaded:
    revision: int
    index: FenceIndex
    checked_at: float


@dataclass(frozen=True, slots=True)
class _Load:
    """A load of a tenant's index in progress, and the fence writes made here
    before it began."""

    tenant: str
    changes: int
    task: asyncio.Task[FenceIndex]


class GeofenceProcessor:
    """Evaluates fences for every tenant; one detector (membership state) per tenant."""

    name = "geofence"

    def __init__(
        self,
        fences: FenceRepository,
        events: EventRepository | None = None,
        refresh_s: float = 2.0,
        dwell_lateness_ms: int = 30_000,
    ) -> None:
        self.fences = fences
        self.events = events
        self.refresh_s = refresh_s
        self.dwell_lateness_ms = dwell_lateness_ms
        self._loaded: dict[str, _Loaded] = {}
        # Per tenant (fence id, version): builds of different tenants may run in
        # worker threads at once.
        self._compiled: dict[str, dict[tuple[str, int], CompiledFence | None]] = {}
        self._detectors: dict[str, FenceDetector] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loading: dict[str, _Load] = {}
        self._restored = self.events is None  # memberships of every tenant loaded
        # Fence writes through this process, per tenant: an index loaded while one
        # happened may predate it, and is checked again at the next batch.
        self._changes: dict[str, int] = {}

    async def process(self, stored: FixBatch) -> list[TrackingEvent]:
        """Events raised by newly stored fixes of one tenant."""
        if len(stored) == 0:
            return []
        tenant = stored.tenant
        async with self._lock(tenant):
            index = await self.index(tenant)
            if len(index) == 0:
                return []
            detector = self._detectors.get(tenant) or await self._detector(tenant)
            now_ms = time.time_ns() // 1_000_000
            if len(stored) <= INLINE_FIXES:
                return detector.evaluate(stored, index, now_ms)
            return await asyncio.to_thread(detector.evaluate, stored, index, now_ms)

    async def tick(self, now_ms: int) -> list[TrackingEvent]:
        """DWELL events of stays that reached ``dwell_ms`` with no fix saying so."""
        if not self._restored:
            await self._restore()
        events: list[TrackingEvent] = []
        for tenant, detector in list(self._detectors.items()):
            if not detector.dwell_pending():
                continue
            async with self._lock(tenant):
                try:
                    index = await self.index(tenant)
                except Unavailable as exc:  # the fence store (StorageUnavailable)
                    # The fixes' path waits and warns; the timer tries next second.
                    log.debug("dwell timer of tenant %s waits: %s", tenant, exc)
                    continue
                events += detector.raise_due_dwells(
                    index, now_ms, self.dwell_lateness_ms
                )
        return events

    async def _restore(self) -> None:
        """Load the memberships of every tenant with fences, once: after a restart
        the timer raises the DWELLs due to devices that send nothing more."""
        try:
            tenants = await self.fences.tenants()
        except Unavailable as exc:  # tried again on the next tick
            log.debug("dwell timer cannot list tenants yet: %s", exc)
            return
        for tenant in tenants:
            async with self._lock(tenant):
                if tenant not in self._detectors:
                    await self._detector(tenant)
        self._restored = True

    async def _detector(self, tenant: str) -> FenceDetector:
        """A tenant's detector, seeded with the memberships its stored events give."""
        detector = FenceDetector(tenant)
        if self.events is not None:
            memberships = await self.events.memberships(tenant)
            detector.seed(memberships, time.time_ns() // 1_000_000)
            log.info("tenant %s: %d memberships restored", tenant, len(memberships))
        self._detectors[tenant] = detector
        return detector

    async def forget_device(self, tenant: str, device: str) -> int:
        """Drop the device's memberships (erasure); how many fences it was in."""
        async with self._lock(tenant):
            detector = self._detectors.get(tenant)
            return detector.forget_device(device) if detector is not None else 0

    def changed(self, tenant: str) -> None:
        """Fences of the tenant were written here: reload before the next batch."""
        self._changes[tenant] = self._changes.get(tenant, 0) + 1
        loaded = self._loaded.get(tenant)
        if loaded is not None:
            loaded.checked_at = -float("inf")

    async def index(self, tenant: str) -> FenceIndex:
        """The tenant's current fence index, rebuilt when its fences changed.

        Callers that arrive while the index is being loaded share that load: two
        builds at once would prepare the same fences' geometry in two threads.
        """
        while True:
            loaded = self._loaded.get(tenant)
            if (
                loaded is not None
                and time.monotonic() - loaded.checked_at < self.refresh_s
            ):
                return loaded.index
            changes = self._changes.get(tenant, 0)
            load = self._loading.get(tenant)
            # A finished load is still listed until its done callback runs; one
            # that did not serve (older than our writes, or failed) would be
            # awaited again at once, and this loop would never yield.
            if load is None or load.task.done():
                task = asyncio.ensure_future(self._load(tenant))
                load = self._loading[tenant] = _Load(tenant, changes, task)
                task.add_done_callback(functools.partial(self._settle, load))
            # Shielded: a caller that is cancelled leaves the load to the others.
            index = await asyncio.shield(load.task)
            if load.changes == changes:
                return index
            # A fence was written here after that load began: load again.

    def _settle(self, load: _Load, _task: object) -> None:
        if self._loading.get(load.tenant) is load:
            del self._loading[load.tenant]

    @asynccontextmanager
    async def using(self, tenant: str) -> AsyncIterator[FenceIndex]:
        """The tenant's index, for queries made while no batch is evaluated with
        it: evaluation may run in a worker thread, and GEOS prepared geometries
        must not be used by two threads at once."""
        async with self._lock(tenant):
            yield await self.index(tenant)

    async def _load(self, tenant: str) -> FenceIndex:
        loaded = self._loaded.get(tenant)
        now = time.monotonic()
        changes = self._changes.get(tenant, 0)
        revision = await self.fences.revision(tenant)
        # A write made here while this load awaited may postdate the revision read:
        # then the index is checked again at the next batch, not refresh_s later.
        if self._changes.get(tenant, 0) != changes:
            now = -float("inf")
        if loaded is not None and loaded.revision == revision:
            loaded.checked_at = now
            return loaded.index
        specs = await self.fences.all(tenant)
        index = await asyncio.to_thread(self._build, tenant, specs)
        if self._changes.get(tenant, 0) != changes:
            now = -float("inf")
        if loaded is not None:
            gone = set(loaded.index.ids.tolist()) - set(index.ids.tolist())
            detector = self._detectors.get(tenant)
            if detector is not None and gone:
                detector.forget_fences(sorted(gone))
        self._loaded[tenant] = _Loaded(revision, index, now)
        log.info(
            "fences of tenant %s loaded: %d (revision %d)", tenant, len(index), revision
        )
        return index

    def _build(self, tenant: str, specs: list[FenceSpec]) -> FenceIndex:
        """The tenant's index; a fence that cannot be evaluated is left out (and
        logged once per version), not its tenant's whole index."""
        cache = self._compiled.get(tenant, {})
        compiled: dict[tuple[str, int], CompiledFence | None] = {}
        for spec in specs:
            key = (spec.fence_id, spec.version)
            compiled[key] = cache[key] if key in cache else compile_usable(spec)
        self._compiled[tenant] = compiled
        return FenceIndex([f for f in compiled.values() if f is not None])

    async def check(
        self,
        tenant: str,
        lat: float,
        lon: float,
        accuracy_m: float,
        labels: frozenset[str] = frozenset(),
    ) -> list[FenceCheck]:
        """Fences containing a position or reached by its accuracy circle, by id;
        only fences carrying all of ``labels``."""
        async with self.using(tenant) as index:
            found = self._check(index, lat, lon, accuracy_m)
            return [
                c
                for c in found
                if labels <= set(index.fences[index.row_of[c.fence_id]].spec.labels)
            ]

    @staticmethod
    def _check(
        index: FenceIndex, lat: float, lon: float, accuracy_m: float
    ) -> list[FenceCheck]:
        reach = max(accuracy_m, EXIT_MARGIN_M)
        rows = index.near(lon, lat, reach)
        if rows.size == 0:
            return []
        lons, lats = np.full(rows.size, lon), np.full(rows.size, lat)
        pts, hit_rows = index.contains(np.array([lon]), np.array([lat]))
        inside = np.isin(rows, hit_rows[pts == 0])
        dist = index.edge_distance_m(lons, lats, rows)
        found = []
        for k in np.argsort(index.ids[rows]):
            if not inside[k] and dist[k] > accuracy_m:
                continue
            row = int(rows[k])
            found.append(
                FenceCheck(
                    fence_id=str(index.ids[row]),
                    inside=bool(inside[k]),
                    certain=bool(inside[k] and dist[k] >= accuracy_m),
                    edge_distance_m=float(-dist[k] if inside[k] else dist[k]),
                    enters=bool(
                        inside[k]
                        and accuracy_m <= index.enter_limits_m(np.array([row]))[0]
                    ),
                )
            )
        return found

    def _lock(self, tenant: str) -> asyncio.Lock:
        return self._locks.setdefault(tenant, asyncio.Lock())
