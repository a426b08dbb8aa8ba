"""Assigned routes kept in the history store, so that every server process
monitors them and a restarted one goes on.

``AssignRoute`` stores the route (its geometry and the expected time of each
segment) with the monitor's first state; ``ClearRoute`` deletes it; ``ARRIVED``
marks it ended, and retention deletes it once the fix it arrived at is older than
the history kept. Every process loads the routes that have not ended when it starts,
in pages (each page read again with back-off while the store cannot answer it), and
keeps them all in its :class:`RouteMonitor`, so a fix is evaluated by whichever
process stores it, with no read of the store per commit. Calls that need the
routes wait for the load up to their deadline.

Other processes learn of a change through route notices (``<prefix>routes``, a
Redis Stream read like the erasure notices): a notice names a device, and the
hearer reads that device's route from the store. A process holds a device once it
applies its fixes; meeting a device it does not hold (at its first fix after a
start, an assignment made elsewhere, or a device moved over from another process),
it first takes the stored checkpoint when that covers later fixes than its own
state, and announces the take-over (a notice of the kind ``held``, which needs no
store read) so that the previous holder lets go. The notices of the devices of one
commit are sent together (a few Redis round trips however many devices).

The monitor's state of the routes that changed is saved every
``route_checkpoint_s`` and at a clean stop. ``GetRouteProgress`` is answered from
memory by the process that holds the device (or by the only process) and from the
stored checkpoint elsewhere: that is as old as the holder's last save, at most
``route_checkpoint_s`` plus the save's own time behind.

>>> import numpy as np
>>> route = PlannedRoute("t", "van", "r1", np.array([60.0, 60.01]),
...     np.array([24.0, 24.0]), np.array([70.0]), 5)
>>> unpack_plan(pack_plan(route), route.tenant, route.device, route.route_id, 5).lat
array([60.  , 60.01])
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import Unavailable
from tracking_grpc.events import EventType, TrackingEvent
from tracking_grpc.routing.monitor import (
    SAVED_DTYPES,
    SAVED_FIELDS,
    PlannedRoute,
    RouteMonitor,
    RouteProgress,
    progress_of,
    route_parts,
    start_state,
)
from tracking_grpc.storage.base import HistoryStore, RouteCheckpoint, StoredRoute

log = logging.getLogger(__name__)

VERSION = 1
PLAN_HEADER = struct.Struct("<HII")  # version, points, segment times
STATE_DTYPE = np.dtype(
    [
        ("version", "<u2"),
        ("total_m", "<f8"),
        *((name, dtype.newbyteorder("<")) for name, dtype in SAVED_DTYPES.items()),
    ]
)
SAVE_PIECE = 250  # routes per checkpoint write
SAVE_PAUSE_S = 0.025  # between two writes of a round: commits get the store
LOAD_PAGE = 1000  # routes per read of the start's load (a few MB, ~0.1 s)
LOAD_RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # before each retry of a page
LOAD_PIECE = 500  # routes put in the monitor between two turns of the event loop
NO_DEADLINE_WAIT_S = 60.0  # longest a call without a deadline waits for the load
DEADLINE_MARGIN_S = 0.05  # a call answers UNAVAILABLE this long before its deadline

HELD = "held"  # the kind of notice of a take-over
Announce = Callable[[str, Sequence[str], str], Awaitable[None]]


def pack_plan(route: PlannedRoute) -> bytes:
    """The route's geometry and segment times, little-endian float64."""
    seconds = np.asarray(route.segment_expected_s, dtype="<f8")
    return b"".join(
        (
            PLAN_HEADER.pack(VERSION, len(route.lat), len(seconds)),
            np.asarray(route.lat, dtype="<f8").tobytes(),
            np.asarray(route.lon, dtype="<f8").tobytes(),
            seconds.tobytes(),
        )
    )


def unpack_plan(
    plan: bytes, tenant: str, device: str, route_id: str, assigned_ms: int
) -> PlannedRoute:
    if len(plan) < PLAN_HEADER.size:
        raise ValueError("route plan of the wrong size")
    version, points, segments = PLAN_HEADER.unpack_from(plan)
    if version != VERSION:
        raise ValueError(f"route plan of version {version}, not {VERSION}")
    values = np.frombuffer(plan, dtype="<f8", offset=PLAN_HEADER.size)
    if len(values) != 2 * points + segments:
        raise ValueError("route plan of the wrong size")
    return PlannedRoute(
        tenant=tenant,
        device=device,
        route_id=route_id,
        lat=values[:points].astype(np.float64),
        lon=values[points : 2 * points].astype(np.float64),
        segment_expected_s=values[2 * points :].astype(np.float64),
        assigned_ms=assigned_ms,
    )


def pack_states(saved: Mapping[str, np.ndarray]) -> list[bytes]:
    """One record per route of the monitor's saved fields (and ``total_m``)."""
    records = np.zeros(len(saved["total_m"]), dtype=STATE_DTYPE)
    records["version"] = VERSION
    for name in ("total_m", *SAVED_FIELDS):
        records[name] = saved[name]
    raw, size = records.tobytes(), STATE_DTYPE.itemsize
    return [raw[i * size : (i + 1) * size] for i in range(len(records))]


def unpack_state(state: bytes) -> dict[str, Any] | None:
    """The saved fields of one record; None for one of another version or size."""
    if len(state) != STATE_DTYPE.itemsize:
        return None
    record = np.frombuffer(state, dtype=STATE_DTYPE)[0]
    if int(record["version"]) != VERSION:
        return None
    return {name: record[name].item() for name in ("total_m", *SAVED_FIELDS)}


class AssignmentKeeper:
    """Assigned routes in the store and in this process's monitor; a FixProcessor
    that evaluates the fixes of every device with a route."""

    name = "routes"

    def __init__(
        self,
        monitor: RouteMonitor,
        store: HistoryStore,
        checkpoint_s: float,
        load_wait_s: float = NO_DEADLINE_WAIT_S,
        load_page: int = LOAD_PAGE,
    ) -> None:
        self.monitor = monitor
        self.store = store
        self.checkpoint_s = checkpoint_s
        self.load_wait_s = load_wait_s  # longest a call without a deadline waits
        self.load_page = load_page  # routes per read of the load
        self.announce: Announce | None = None  # None: the only process
        self.loaded_routes = 0  # so far, while loading
        self._loaded = asyncio.Event()
        self._saving: Counter[tuple[str, str]] = Counter()  # saves under way
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rounds: asyncio.Task[None] | None = None

    def start(self, listen: Callable[[], Awaitable[None]] | None = None) -> None:
        """In the background: start hearing route notices (``listen``), load the
        stored routes page by page (a page is retried until the store answers it:
        fixes wait for the load, calls up to their deadline), then save
        checkpoints every round."""
        self._rounds = asyncio.create_task(self._run(listen), name="route-checkpoints")

    async def assign(
        self, route: PlannedRoute, deadline: float | None = None
    ) -> RouteProgress:
        """Store the device's ``route``, monitor it here, tell the others; a failed
        store leaves the device's previous route monitored. ``deadline``: the
        call's, in event-loop time (None: none); it waits for the load until
        just before it."""
        await self._wait_loaded(deadline)
        parts = route_parts(route)
        state = start_state(route, parts)
        checkpoint = RouteCheckpoint(
            route.tenant,
            route.device,
            route.route_id,
            route.assigned_ms,
            0,
            pack_states({k: np.array([v]) for k, v in state.items()})[0],
        )
        await self.store.assign_route(StoredRoute(pack_plan(route), checkpoint))
        progress = self.monitor.assign(route, state, parts)
        await self._tell(route.tenant, [route.device])
        return progress

    async def clear(
        self, tenant: str, device: str, deadline: float | None = None
    ) -> bool:
        """Stop monitoring the device everywhere; False when it had no route."""
        await self._wait_loaded(deadline)
        stored = await self.store.clear_route(tenant, device)
        here = self.monitor.clear(tenant, device)
        await self._tell(tenant, [device])
        return stored or here

    async def progress(
        self, tenant: str, device: str, deadline: float | None = None
    ) -> RouteProgress | None:
        """From memory where the state here is the newest, else from the store."""
        await self._wait_loaded(deadline)
        if self.announce is None or self.monitor.held(tenant, device):
            here = self.monitor.progress(tenant, device)
            if here is not None:
                return here
        for stored in await self.store.routes(tenant, [device]):
            saved = unpack_state(stored.checkpoint.state)
            if saved is not None:
                return progress_of(stored.checkpoint.route_id, saved)
        return None

    async def process(self, stored: FixBatch) -> list[TrackingEvent]:
        """Events raised by newly stored fixes of one tenant."""
        await self._loaded.wait()
        unheld = self.monitor.unheld(stored)
        if unheld:
            await self._take_over(stored.tenant, unheld)
        events = self.monitor.evaluate(stored, int(time.time() * 1000))
        arrived = [e.device for e in events if e.type is EventType.ARRIVED]
        if arrived:
            self._spawn(self._end(stored.tenant, arrived))
        return events

    async def heard(self, tenant: str, device: str) -> dict[str, int]:
        """Another process changed the device's route: follow the store."""
        await self._loaded.wait()
        found = await self.store.routes(tenant, [device])
        if not found or found[0].checkpoint.ended:
            return {"route": int(self.monitor.clear(tenant, device))}
        checkpoint = found[0].checkpoint
        saved = unpack_state(checkpoint.state)
        here = self.monitor.route(tenant, device)
        same = here is not None and (here.route_id, here.assigned_ms) == (
            checkpoint.route_id,
            checkpoint.assigned_ms,
        )
        if same:  # this process has it already
            return {}
        self.monitor.assign(_planned(found[0]), saved)
        return {"assigned": 1}

    async def released(self, tenant: str, device: str) -> dict[str, int]:
        """Another process took the device over: its state here is no longer the
        newest (its next fix here reads the checkpoint first)."""
        await self._loaded.wait()
        held = self.monitor.held(tenant, device)
        self.monitor.hold(tenant, device, False)
        return {"released": int(held)}

    async def forget_arrived(self, cutoff_ms: int) -> dict[str, int]:
        """Retention: stop keeping here the routes that arrived before the cutoff
        (their stored rows go with the history store's purge), but for those whose
        save is under way: a failed save marks them changed again, to be saved
        (as ended) by the next round."""
        if not self._loaded.is_set():
            return {}
        forgotten = self.monitor.forget_arrived(cutoff_ms, keep=self._saving)
        return {"arrived routes kept in memory": forgotten}

    async def save_checkpoints(self, pause_s: float = 0.0) -> int:
        """Save the state of the routes that changed; the number saved."""
        routes, saved = self.monitor.take_changed()
        await self._save(routes, saved, pause_s)
        return len(routes)

    async def stop(self, deadline: float | None = None) -> None:
        """Stop the rounds and save what changed since the last one."""
        if self._rounds is not None:
            self._rounds.cancel()
            await asyncio.gather(self._rounds, return_exceptions=True)
            self._rounds = None
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self._loaded.is_set():
            return
        timeout = None
        if deadline is not None:
            timeout = max(deadline - asyncio.get_running_loop().time(), 1.0)
        try:
            saved = await asyncio.wait_for(self.save_checkpoints(), timeout)
            log.info("saved the monitoring of %d routes at stop", saved)
        except (Unavailable, TimeoutError) as exc:
            log.warning("route checkpoints not saved at stop: %r", exc)

    async def _wait_loaded(self, deadline: float | None) -> None:
        """Wait for the load: until just before the call's ``deadline`` (event-loop
        time, so the time the call spent before, planning a route say, counts), or
        ``load_wait_s`` for a call without one."""
        if self._loaded.is_set():
            return
        if deadline is None:
            limit = self.load_wait_s
        else:
            now = asyncio.get_running_loop().time()
            limit = deadline - DEADLINE_MARGIN_S - now
        try:
            async with asyncio.timeout(max(limit, 0.0)):
                await self._loaded.wait()
        except TimeoutError:
            raise Unavailable(
                f"the assigned routes are still loading ({self.loaded_routes} "
                "loaded so far); retry"
            ) from None

    async def _run(self, listen: Callable[[], Awaitable[None]] | None) -> None:
        try:
            if listen is not None:  # first: a change after the load is then heard
                await self._listen(listen)
            await self._load()
        except Exception:  # fixes must not wait for ever: monitor none
            log.exception("assigned routes not loaded; none monitored until restart")
            self.monitor.clear_all()
        finally:  # also when stopped during the load
            self._loaded.set()
        while True:
            await asyncio.sleep(self.checkpoint_s)
            try:
                saved = await self.save_checkpoints(SAVE_PAUSE_S)
                log.debug("saved the monitoring of %d routes", saved)
            except Unavailable as exc:  # kept changed: the next round saves them
                log.warning("route checkpoints not saved: %s", exc.message)
            except Exception:
                log.exception("saving route checkpoints failed")

    async def _listen(self, listen: Callable[[], Awaitable[None]]) -> None:
        try:
            await listen()
        except TimeoutError:
            log.warning("route notices not heard yet; loading the routes")
        except Exception:  # the routes are loaded all the same
            log.exception("route notices not started; changes elsewhere may be missed")

    async def _load(self) -> None:
        """Every stored route not ended, in pages of ``load_page`` by (tenant,
        device), each read well within the store's timeout and prepared off the
        event loop (about a millisecond per route of 300 points)."""
        after: tuple[str, str] | None = None
        pages = 0
        while True:
            page = await self._read_page(after)
            prepared = await asyncio.to_thread(_prepare, page)
            for n, (planned, parts, saved) in enumerate(prepared, 1):
                self.monitor.assign(planned, saved, parts)
                if n % LOAD_PIECE == 0:  # let calls and commits in between
                    await asyncio.sleep(0)
            self.loaded_routes += len(prepared)
            pages += 1
            if len(page) < self.load_page:
                break
            last = page[-1].checkpoint
            after = (last.tenant, last.device)
        log.info(
            "monitoring %d assigned routes (read in %d pages)",
            self.loaded_routes,
            pages,
        )

    async def _read_page(self, after: tuple[str, str] | None) -> list[StoredRoute]:
        """One page of the load; retried with back-off while the store is
        unavailable (another failure ends the load)."""
        for attempt in itertools.count():
            try:
                return await self.store.monitored_routes(after, self.load_page)
            except Unavailable as exc:
                delay = LOAD_RETRY_S[min(attempt, len(LOAD_RETRY_S) - 1)]
                log.warning(
                    "a page of the assigned routes not read (%d loaded so far), "
                    "retried in %.1f s: %s",
                    self.loaded_routes,
                    delay,
                    exc.message,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _take_over(self, tenant: str, devices: list[str]) -> None:
        """Continue from the stored checkpoints of devices held nowhere here (the
        only process has the newest state already)."""
        found: list[StoredRoute] = []
        try:
            if self.announce is not None:
                found = await self.store.routes(tenant, devices)
        except Unavailable as exc:  # go on from the state here
            log.warning("route checkpoints not read: %s", exc.message)
        for stored in found:
            c = stored.checkpoint
            here = self.monitor.route(tenant, c.device)
            saved = unpack_state(c.state)
            if here is None or saved is None or c.ended:
                continue
            if (here.route_id, here.assigned_ms) == (c.route_id, c.assigned_ms):
                self.monitor.restore(tenant, c.device, saved)
        for device in devices:
            self.monitor.hold(tenant, device, True)
        self._spawn(self._tell(tenant, devices, HELD))

    async def _end(self, tenant: str, devices: list[str]) -> None:
        """Save the arrivals at once, as ended, and tell the others."""
        routes, saved = self.monitor.take_changed([(tenant, d) for d in devices])
        try:
            await self._save(routes, saved)
        except Unavailable as exc:
            log.warning("arrivals not saved: %s", exc.message)
            return
        await self._tell(tenant, devices)

    async def _save(
        self,
        routes: list[PlannedRoute],
        saved: Mapping[str, np.ndarray],
        pause_s: float = 0.0,
    ) -> None:
        """Save in pieces; an arrived route is saved as ended. The routes of the
        pieces not written (the store failed, or the save was cancelled by a
        stop) are marked changed again, for the next round or the save at stop;
        until then retention keeps them (``forget_arrived``)."""
        keys = [(r.tenant, r.device) for r in routes]
        self._saving.update(keys)  # before any wait: taken changed just before
        try:
            await self._write(routes, saved, pause_s)
        finally:
            self._saving.subtract(keys)
            for key in keys:
                if self._saving[key] <= 0:
                    self._saving.pop(key, None)

    async def _write(
        self,
        routes: list[PlannedRoute],
        saved: Mapping[str, np.ndarray],
        pause_s: float,
    ) -> None:
        states = pack_states(saved)
        checkpoints = [
            RouteCheckpoint(
                r.tenant,
                r.device,
                r.route_id,
                r.assigned_ms,
                int(last_ms),
                state,
                bool(arrived),
            )
            for r, last_ms, arrived, state in zip(
                routes, saved["last_ms"], saved["arrived"], states, strict=True
            )
        ]
        written = 0
        try:
            for first in range(0, len(checkpoints), SAVE_PIECE):
                if pause_s and first:
                    await asyncio.sleep(pause_s)
                piece = checkpoints[first : first + SAVE_PIECE]
                await self.store.save_route_checkpoints(piece)
                written = first + len(piece)
        except BaseException:
            keys = [(c.tenant, c.device) for c in checkpoints[written:]]
            self.monitor.mark_changed(keys)
            raise

    async def _tell(self, tenant: str, devices: list[str], kind: str = "") -> None:
        """One notice per device, sent together (a take-over of many devices at
        once is a few round trips to Redis, not one per device)."""
        if self.announce is None or not devices:
            return
        try:
            await self.announce(tenant, devices, kind)
        except Unavailable as exc:
            log.warning(
                "%d route notices of tenant %s lost: %s",
                len(devices),
                tenant,
                exc.message,
            )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _prepare(
    stored: list[StoredRoute],
) -> list[tuple[PlannedRoute, dict[str, np.ndarray], dict[str, Any] | None]]:
    """Each stored route with its segment arrays and saved state."""
    prepared = []
    for route in stored:
        try:
            planned = _planned(route)
        except ValueError as exc:
            c = route.checkpoint
            log.warning("route of %r of %s left out: %s", c.device, c.tenant, exc)
            continue
        saved = unpack_state(route.checkpoint.state)
        prepared.append((planned, route_parts(planned), saved))
    return prepared


def _planned(stored: StoredRoute) -> PlannedRoute:
    c = stored.checkpoint
    return unpack_plan(stored.plan, c.tenant, c.device, c.route_id, c.assigned_ms)
