"""The geofence FixProcessor: newly stored fixes in, ENTER/EXIT/DWELL/CROSS out.

Each tenant's fences are compiled once into a :class:`FenceIndex` and rebuilt (in a
worker thread, reusing every unchanged fence) when the repository's revision moves;
the revision is checked at most every ``refresh_s`` seconds, and at once after a
change made through this process. Every second the ingest pipeline's ``tick`` raises
the DWELL events of devices silent inside a fence (rule in dwell.py).

With other server processes (``hear``: take-over notices on Redis), a device's
fixes may come to any of them, and to another after a reconnect. A process holds
the devices whose fixes it evaluated since it loaded their memberships. A batch
bringing fixes of devices it does not hold (every device, after the tenant's load)
first reloads their memberships from the stored events, in one query for them all,
and announces the take-over; the process that held them lets them go (``released``:
their memberships and DWELL timers are dropped, and reloaded if they come back).
Held devices cost no query. A single process (no notices) holds every device.
A device whose fixes in the batch are all older than its newest stored event is
not taken over: they are late (another process went on with it). Take-overs are
announced together, every ANNOUNCE_EVERY_S, by one task.

The stored events lag the fixes: the previous holder acks a fix once it is
stored, and stores the fix's events after its processors have had it. So a
take-over with a history store also reads, in one query for the batch's devices
and while the memberships are read, each one's newest stored fixes before its
first fix in the batch, and judges before the batch those the previous holder may
not have turned into stored events: at most REPLAY_FIXES, after the device's
newest stored event, received within ``dwell_lateness_ms``, and not late when
they came; the fix before them only places the device (``_unjudged``). Their
events are the ones the previous holder raises for them, with the same
``event_id`` (the store keeps one; a holder that stopped before storing them
loses none).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import Unavailable
from tracking_grpc.events import TrackingEvent
from tracking_grpc.geofence.detector import (
    EXIT_MARGIN_M,
    FenceDetector,
    judged_in_turn,
)
from tracking_grpc.geofence.index import CompiledFence, FenceIndex, compile_usable
from tracking_grpc.geofence.messages import refused_settings
from tracking_grpc.geofence.model import FenceSpec
from tracking_grpc.storage.base import HistoryStore
from tracking_grpc.storage.fences import EventRepository, FenceRepository, Membership

log = logging.getLogger(__name__)
_T = TypeVar("_T")

INLINE_FIXES = 500  # larger batches are evaluated in a worker thread
INLINE_MEMBERS = 50_000  # above, take-overs rebuild memberships in a worker thread

LISTENING = "geofence-notices-start"
NOTICE_BACK_S = 10.0  # longest a take-over's own notice is waited for
ANNOUNCE_EVERY_S = 0.02  # take-overs made meanwhile are announced together
OUTDATED_NAMED = 5  # fence ids the warning about outdated fences names
# Stored fixes a take-over judges again per device, at most (the previous holder's
# not yet turned into stored events: a few hundred milliseconds of them).
REPLAY_FIXES = 8
# ... of the day before its first fix in the batch (the partitions read).
REPLAY_SPAN_MS = 86_400_000
_NO_EVENT_MS = -(2**62)  # the newest stored event of a device with none
# Tells the other processes that this one took devices of a tenant over.
Announce = Callable[[str, Sequence[str]], Awaitable[None]]


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
        history: HistoryStore | None = None,
    ) -> None:
        self.fences = fences
        self.events = events
        self.history = history  # the fixes a take-over judges again; or none
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
        self.announce: Announce | None = None  # None: the only process
        # Devices other processes took over, per tenant, let go at the tenant's
        # next batch or timer round (one rebuild of the memberships for many).
        self._letting_go: dict[str, set[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # When this process began a take-over whose notice the stream has not
        # brought back yet, per (tenant, device), and how many such take-overs
        # are pending: a notice of another process read before it is older, and
        # lets nothing go (for NOTICE_BACK_S at most: a notice the listener
        # missed holds nothing up for ever). Oldest first (pruned by ``tick``).
        self._announcing: dict[tuple[str, str], tuple[float, int]] = {}
        # Take-overs not announced yet, per tenant: one task announces them all
        # every ANNOUNCE_EVERY_S (a reconnect storm makes few stream entries).
        self._unsent: dict[str, set[str]] = {}
        self._announcer: asyncio.Task[None] | None = None
        self._announce_down = False  # the last announcement failed (warned once)
        # Tenants whose stored fences were checked against today's rules for
        # names, labels and metadata (once per process: see _warn_outdated).
        self._rules_checked: set[str] = set()

    async def process(self, stored: FixBatch) -> list[TrackingEvent]:
        """Events raised by newly stored fixes of one tenant."""
        if len(stored) == 0:
            return []
        tenant = stored.tenant
        async with self._lock(tenant):
            index = await self.index(tenant)
            if len(index) == 0:
                return []
            detector = self._detectors.get(tenant)
            loaded_now = detector is None
            if detector is None:
                detector = await self._detector(tenant)
            replay = FixBatch.empty(tenant)
            if self.announce is not None:
                try:
                    replay = await self._take_over(detector, stored, loaded_now)
                except BaseException:
                    detector.unprepare()
                    raise
            batch = stored if len(replay) == 0 else FixBatch.concat([replay, stored])
            now_ms = time.time_ns() // 1_000_000
            try:
                if len(batch) <= INLINE_FIXES:
                    return detector.evaluate(batch, index, now_ms)
                return await asyncio.to_thread(detector.evaluate, batch, index, now_ms)
            except Exception:
                # Taken over again by a retry of the batch, which judges these
                # fixes again (the failed evaluation changed no membership).
                detector.release(sorted(set(replay.device.tolist())))
                raise

    async def tick(self, now_ms: int) -> list[TrackingEvent]:
        """DWELL events of stays that reached ``dwell_ms`` with no fix saying so."""
        if not self._restored:
            await self._restore()
        self._prune_announcing()
        events: list[TrackingEvent] = []
        for tenant, detector in list(self._detectors.items()):
            if tenant in self._letting_go:
                async with self._lock(tenant):
                    await self._let_go(detector)
            if not detector.dwell_pending():
                continue
            async with self._lock(tenant):
                try:
                    index = await self.index(tenant)
                except Unavailable as exc:  # the fence store (StorageUnavailable)
                    # The fixes' path waits and warns; the timer tries next second.
                    log.debug("dwell timer of tenant %s waits: %s", tenant, exc)
                    continue
                refreshed = self.announce is None or await self._refresh_due(
                    detector, index, now_ms
                )
                # Unrefreshed: the devices held here need no read.
                events += detector.raise_due_dwells(
                    index, now_ms, self.dwell_lateness_ms, held_only=not refreshed
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

    def hear(self, announce: Announce, listen: Callable[[], Awaitable[None]]) -> None:
        """Share devices with other processes: ``announce`` tells them of a
        take-over, ``listen`` (in the background) starts hearing the notices,
        which call ``released`` (theirs) and ``announced`` (this process's own)."""
        self.announce = announce
        self._spawn(self._listen(listen), LISTENING)

    def holds(self, tenant: str, device: str) -> bool:
        """Whether this process evaluates the device's fixes from memberships of
        its own (a single process holds every device it loaded)."""
        detector = self._detectors.get(tenant)
        if detector is None or device in self._letting_go.get(tenant, ()):
            return False
        return self.announce is None or detector.holds(device)

    async def released(self, tenant: str, device: str) -> dict[str, int]:
        """Another process took the device over: let it go here before the
        tenant's next batch or timer round; unless this process's own take-over
        of it is still to come in the stream (later than that notice)."""
        pending = self._announcing.get((tenant, device))
        if pending is not None and time.monotonic() - pending[0] < NOTICE_BACK_S:
            return {}
        self._announcing.pop((tenant, device), None)
        if tenant not in self._detectors:
            return {}
        self._letting_go.setdefault(tenant, set()).add(device)
        return {"let go": 1}

    async def announced(self, tenant: str, device: str) -> None:
        """This process's notice of a take-over of the device came back."""
        self._unexpect(tenant, [device])

    def _expect(self, tenant: str, devices: list[str]) -> None:
        """Take-overs of the devices begin: until their notices come back, a
        notice of another process is older (``released``)."""
        now = time.monotonic()
        for device in devices:
            # Moved to the end: the dict stays ordered by time.
            _, count = self._announcing.pop((tenant, device), (now, 0))
            self._announcing[(tenant, device)] = (now, count + 1)

    def _unexpect(self, tenant: str, devices: list[str]) -> None:
        """A take-over's notice came back, or none will."""
        for device in devices:
            pending = self._announcing.get((tenant, device))
            if pending is None:
                continue
            if pending[1] > 1:
                self._announcing[(tenant, device)] = (pending[0], pending[1] - 1)
            else:
                del self._announcing[(tenant, device)]

    def _prune_announcing(self) -> None:
        """Forget take-overs whose notices never came back (the listener not
        started yet, the stream trimmed): the oldest first."""
        oldest = time.monotonic() - NOTICE_BACK_S
        while self._announcing:
            key, (sent, _) = next(iter(self._announcing.items()))
            if sent >= oldest:
                break
            del self._announcing[key]

    async def drain(self, deadline: float | None = None) -> None:
        """Stop listening and finish announcing (a stop, after the last fixes)."""
        for task in list(self._tasks):
            if task.get_name() == LISTENING:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _take_over(
        self, detector: FenceDetector, stored: FixBatch, loaded_now: bool
    ) -> FixBatch:
        """Reload the memberships of the batch's devices not held here, in one
        store query (none when the tenant's were loaded for this very batch and
        there is no history store), and tell the other processes to let them
        go. A device whose fixes are all older than its newest stored event
        (late: another process went on with it) is not taken over. The stored
        fixes to judge before the batch (see the module docstring)."""
        tenant = stored.tenant
        replay = FixBatch.empty(tenant)
        await self._let_go(detector)
        if len(stored) > INLINE_FIXES:
            devices = await asyncio.to_thread(detector.unheld, stored)
        else:
            devices = detector.unheld(stored)
        if not devices:
            return replay
        # Before the query: a notice of another process read while it runs is
        # older than this take-over's.
        self._expect(tenant, devices)
        chosen = devices
        try:
            if self.events is None or (loaded_now and self.history is None):
                detector.hold(devices)
            else:
                devices, replay = await self._reload(detector, stored, devices)
        except BaseException:
            self._unexpect(tenant, chosen)
            raise
        if len(devices) < len(chosen):
            taken = set(devices)
            self._unexpect(tenant, [d for d in chosen if d not in taken])
        if not devices:
            return replay
        log.debug("tenant %s: %d devices taken over", tenant, len(devices))
        self._unsent.setdefault(tenant, set()).update(devices)
        if self._announcer is None or self._announcer.done():
            self._announcer = self._spawn(self._announce_unsent())
        return replay

    async def _reload(
        self, detector: FenceDetector, stored: FixBatch, devices: list[str]
    ) -> tuple[list[str], FixBatch]:
        """Read the devices' stored memberships and take over those with fixes
        newer than their newest stored event; the devices taken over, and their
        stored fixes to judge before the batch. With a history store, their
        stored fixes are read at the same time (``_unjudged``)."""
        assert self.events is not None
        recent_ms = time.time_ns() // 1_000_000 - self.dwell_lateness_ms
        stored_ones, found = await _both(
            self.events.memberships(detector.tenant, devices),
            self._stored_fixes(stored, devices, recent_ms),
        )
        newest = stored_ones.newest_ms
        memberships: list[Membership] = stored_ones
        late = detector.late(stored, newest)
        if late:
            detector.floor(late, newest)
            log.debug("tenant %s: %d devices' fixes late", detector.tenant, len(late))
            skip = set(late)
            devices = [d for d in devices if d not in skip]
            memberships = [m for m in memberships if m.device not in skip]
        placing, replay = _unjudged(found, set(devices), newest, recent_ms)
        if len(replay):
            log.debug(
                "tenant %s: %d stored fixes of %d devices taken over judged again",
                stored.tenant,
                len(replay),
                len(set(replay.device.tolist())),
            )
        now_ms = time.time_ns() // 1_000_000
        reload = functools.partial(
            self._resume, detector, devices, memberships, newest, now_ms, placing
        )
        await self._rebuild(detector, reload, len(memberships))
        return devices, replay

    @staticmethod
    def _resume(
        detector: FenceDetector,
        devices: list[str],
        memberships: list[Membership],
        newest_ms: dict[str, int],
        now_ms: int,
        placing: FixBatch,
    ) -> None:
        detector.reload(devices, memberships, newest_ms, now_ms)
        detector.place(placing)

    async def _stored_fixes(
        self, stored: FixBatch, devices: list[str], recent_ms: int
    ) -> FixBatch:
        """Each device's newest REPLAY_FIXES + 1 stored fixes of the
        REPLAY_SPAN_MS before its first in the batch, but none received before
        ``recent_ms`` save the newest of those (one query for them all; none
        without a history store)."""
        if self.history is None or not devices:
            return FixBatch.empty(stored.tenant)
        first = _first_times(stored)
        bounds = {d: (first[d] - REPLAY_SPAN_MS, first[d]) for d in devices}
        return await self.history.fixes_before(
            stored.tenant, bounds, REPLAY_FIXES + 1, recent_ms
        )

    @staticmethod
    async def _rebuild(
        detector: FenceDetector, rebuild: Callable[[], _T], adding: int
    ) -> _T:
        """Rebuild the tenant's memberships, in a worker thread when they are many
        (the tenant's lock is held: its queries wait, as for a batch)."""
        if detector.members() + adding > INLINE_MEMBERS:
            return await asyncio.to_thread(rebuild)
        return rebuild()

    async def _refresh_due(
        self, detector: FenceDetector, index: FenceIndex, now_ms: int
    ) -> bool:
        """Before the timer raises the DWELL of devices not held here (loaded at
        the tenant's load, their fixes going to another process), read their
        stored memberships again (one query): their stay may have ended there.
        False when the store cannot answer (the timer raises the DWELLs of the
        devices held here only, and tries the others next second)."""
        devices = detector.due_unheld(index, now_ms, self.dwell_lateness_ms)
        if not devices or self.events is None:
            return True
        try:
            memberships = await self.events.memberships(detector.tenant, devices)
        except Unavailable as exc:
            log.debug("dwell timer of tenant %s waits: %s", detector.tenant, exc)
            return False
        detector.refresh(devices, memberships)
        return True

    async def _let_go(self, detector: FenceDetector) -> None:
        """Let the devices other processes took over go (one rebuild), but not
        one this process is taking over again (its notice is the later)."""
        tenant = detector.tenant
        devices = self._letting_go.pop(tenant, None)
        if not devices:
            return
        gone = sorted(d for d in devices if (tenant, d) not in self._announcing)
        release = functools.partial(detector.release, gone)
        dropped = await self._rebuild(detector, release, 0)
        log.debug(
            "tenant %s: %d devices let go (%d memberships)", tenant, len(gone), dropped
        )

    async def _announce_unsent(self) -> None:
        """Announce the take-overs made meanwhile, every ANNOUNCE_EVERY_S, while
        there are any."""
        while self._unsent:
            await asyncio.sleep(ANNOUNCE_EVERY_S)
            unsent, self._unsent = self._unsent, {}
            for tenant, devices in unsent.items():
                await self._tell(tenant, sorted(devices))

    async def _tell(self, tenant: str, devices: list[str]) -> None:
        assert self.announce is not None
        try:
            await self.announce(tenant, devices)
        except Exception as exc:
            self._unexpect(tenant, devices)  # no notice will come back
            reason = exc.message if isinstance(exc, Unavailable) else repr(exc)
            if self._announce_down:
                log.debug("take-over of %d devices not announced", len(devices))
                return
            self._announce_down = True
            log.warning(
                "geofence take-overs not announced (%d devices of tenant %s; "
                "further failures logged at DEBUG until it works): %s",
                len(devices),
                tenant,
                reason,
                exc_info=not isinstance(exc, Unavailable),
            )
            return
        if self._announce_down:
            self._announce_down = False
            log.info("geofence take-overs announced again")

    async def _listen(self, listen: Callable[[], Awaitable[None]]) -> None:
        try:
            await listen()
        except TimeoutError:
            log.warning("geofence take-over notices not heard yet; retried")
        except Exception:
            log.exception("geofence take-over notices not started")

    def _spawn(
        self, work: Awaitable[None], name: str | None = None
    ) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        if name is not None:
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
        if tenant not in self._rules_checked:
            self._rules_checked.add(tenant)
            await asyncio.to_thread(_warn_outdated, tenant, specs)
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


def _warn_outdated(tenant: str, specs: Sequence[FenceSpec]) -> None:
    """One warning for the tenant's fences stored under older rules, whose name,
    labels or metadata today's checks refuse: they load and are evaluated as
    before, but their next update must correct them (it is refused otherwise)."""
    outdated = [
        (spec.fence_id, why) for spec in specs if (why := refused_settings(spec))
    ]
    if not outdated:
        return
    named = ", ".join(fence_id for fence_id, _ in outdated[:OUTDATED_NAMED])
    more = (
        f" and {len(outdated) - OUTDATED_NAMED} more"
        if len(outdated) > OUTDATED_NAMED
        else ""
    )
    log.warning(
        "tenant %s: %d fences stored under older rules have a name, labels or "
        "metadata that today's rules refuse; they are evaluated as before, but "
        "must be corrected at their next update (refused until then): %s%s "
        "(fence %s: %s)",
        tenant,
        len(outdated),
        named,
        more,
        outdated[0][0],
        outdated[0][1],
    )


async def _both[A, B](first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Both results, awaited at once; when one fails (or the caller is
    cancelled) the other is cancelled and awaited, and the failure raised."""
    one, two = asyncio.ensure_future(first), asyncio.ensure_future(second)
    try:
        return await one, await two
    except BaseException:
        for task in (one, two):
            task.cancel()
        await asyncio.gather(one, two, return_exceptions=True)
        raise


def _unjudged(
    found: FixBatch, devices: set[str], newest_ms: dict[str, int], recent_ms: int
) -> tuple[FixBatch, FixBatch]:
    """Of the stored fixes read (``_stored_fixes``) of the devices taken over,
    those the previous holder may not have turned into stored events yet, to
    judge before the batch: the ones after the device's newest stored event,
    after its newest fix received before ``recent_ms`` and after the oldest one
    read when there may be more; but for those that were late when they came
    (judged as late there). And the fix before them, which only places its
    device."""
    found = found.take(np.isin(found.device.astype(str), list(devices)))
    if len(found) == 0:
        return found, found
    found = found.sorted_by_device_time()
    names = found.device.astype(str)
    opens = np.flatnonzero(np.r_[True, names[1:] != names[:-1]])
    counts = np.diff(np.r_[opens, len(found)])
    device = np.repeat(np.arange(opens.size), counts)
    since = np.array([newest_ms.get(n, _NO_EVENT_MS) for n in names[opens].tolist()])
    # A prefix of each device's fixes (by time): judged, their events stored.
    settled = (found.time_ms <= since[device]) | (found.received_ms < recent_ms)
    settled[opens[counts > REPLAY_FIXES]] = True
    prefix = np.add.reduceat(settled.astype(np.int64), opens)
    placing = opens[prefix > 0] + prefix[prefix > 0] - 1
    return found.take(placing), found.take(~settled & judged_in_turn(found))


def _first_times(batch: FixBatch) -> dict[str, int]:
    """Each device's first fix time in the batch."""
    names, inverse = np.unique(batch.device.astype(str), return_inverse=True)
    first = np.full(names.size, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, inverse, batch.time_ms.astype(np.int64))
    return dict(zip(names.tolist(), first.tolist(), strict=True))
