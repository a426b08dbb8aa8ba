"""Route monitoring: progress, ETA and off-route events of devices on planned routes.

Every assigned route lives in flat segment arrays shared by all devices, and fixes
are evaluated in rounds: round k takes the k-th new fix of every monitored device
of the batch at once, so a batch of many devices costs a few numpy passes.

For each fix the monitor looks for the fix's place on its route in a window around
where the device should be by now (a little behind its progress, up to the furthest
it could have gone since its last fix), scoring each candidate by its distance from
the fix plus a penalty for straying from the expected progress. That keeps a planned
U-turn or loop (the same street twice) on the right pass. A device is OFF_ROUTE after
``off_route_fixes`` consecutive fixes further than ``off_route_m`` from the route
beyond their accuracy radius, and BACK_ON_ROUTE after ``back_on_route_fixes`` within
it, anywhere ahead on the route. Fixes less accurate than ``max_accuracy_m`` say
nothing either way. ARRIVED comes once near the destination at the end of the route;
a device off the route until then is BACK_ON_ROUTE at that fix first (the
destination is on the route, and no later fix could confirm it), so that every
OFF_ROUTE is closed.
The ETA is the expected time of the rest of the route (engine durations scaled by
learned travel-time factors) times the device's recent pace against that expectation;
ETA_UPDATED is raised when it moves by more than ``eta_change_s`` and more than
``eta_change_share`` of the time left.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import EventType, TrackingEvent, event_id
from tracking_grpc.routing.geometry import (
    project_on_segments,
    segment_lengths_m,
    to_local,
)

log = logging.getLogger(__name__)

ROUTE_KEY_STRIDE_M = 1e9  # separates routes in the flat along-route search keys
# Searching the whole rest of a route, prefer the earlier of two equally near places
# (the start, not the end, of a loop) without pulling towards the expected progress.
WIDE_PENALTY = 1e-3


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    """Thresholds of route monitoring."""

    off_route_m: float = 50.0
    off_route_fixes: int = 3
    back_on_route_fixes: int = 2
    max_accuracy_m: float = 150.0
    arrival_radius_m: float = 40.0
    eta_change_s: float = 60.0
    eta_change_share: float = 0.15
    behind_m: float = 30.0
    min_ahead_m: float = 150.0
    max_speed_mps: float = 50.0
    stray_penalty: float = 0.3
    pace_half_life_s: float = 180.0


@dataclass(frozen=True, slots=True)
class PlannedRoute:
    """A route assigned to a device, with the expected time of each segment."""

    tenant: str
    device: str
    route_id: str
    lat: np.ndarray
    lon: np.ndarray
    segment_expected_s: np.ndarray
    assigned_ms: int


@dataclass(frozen=True, slots=True)
class RouteProgress:
    """Where a device is on its planned route."""

    route_id: str
    total_m: float
    progress_m: float
    remaining_m: float
    eta_ms: int
    off_route: bool
    deviation_m: float
    arrived: bool
    last_fix_ms: int


class RouteMonitor:
    """Planned routes of devices and their progress, evaluated on arrays (the
    server's processor is ``assignments.AssignmentKeeper``, which stores them)."""

    def __init__(self, settings: MonitorSettings | None = None) -> None:
        self.settings = settings or MonitorSettings()
        self._routes: list[PlannedRoute] = []
        self._parts: list[dict[str, np.ndarray]] = []
        self._slots: dict[tuple[str, str], int] = {}
        self._state: dict[str, np.ndarray] = _empty_state(0)
        self._new: list[dict[str, Any]] = []  # states of routes not yet in _state
        self._flat: _FlatRoutes = _FlatRoutes.build([])
        self._stale = False  # _flat misses assigned or cleared routes
        self._generation = 0  # changes with the slots of the routes
        self._last: tuple[FixBatch, int, np.ndarray] | None = None  # _fix_slots's

    def __len__(self) -> int:
        return len(self._routes)

    def assign(
        self,
        route: PlannedRoute,
        saved: Mapping[str, Any] | None = None,
        parts: dict[str, np.ndarray] | None = None,
    ) -> RouteProgress:
        """Monitor the device on this route from now on (replacing any other), from
        the start or from a ``saved`` state (values of the ``SAVED_FIELDS``);
        ``parts``: the route's :func:`route_parts`, when already computed."""
        self.clear(route.tenant, route.device)
        if parts is None:
            parts = route_parts(route)
        self._generation += 1
        self._slots[(route.tenant, route.device)] = len(self._routes)
        self._routes.append(route)
        self._parts.append(parts)
        if saved is None:
            saved = start_state(route, parts)
        row = {k: saved[k] for k in SAVED_FIELDS if k in saved}
        self._new.append(row)
        self._stale = True  # the flat arrays are rebuilt once, when next needed
        return progress_of(
            route.route_id, {**_empty_row(), **row, "total_m": parts["total_m"][0]}
        )

    def route(self, tenant: str, device: str) -> PlannedRoute | None:
        slot = self._slots.get((tenant, device))
        return None if slot is None else self._routes[slot]

    def held(self, tenant: str, device: str) -> bool:
        """Whether this process applies the device's fixes: its state here is the
        newest (until another process takes the device over)."""
        slot = self._slots.get((tenant, device))
        if slot is None:
            return False
        self._refresh()
        return bool(self._state["held"][slot])

    def unheld(self, stored: FixBatch) -> list[str]:
        """Devices of the batch on a route, not arrived, that this process does not
        hold: their newest state may be another process's checkpoint."""
        if not self._routes or len(stored) == 0:
            return []
        self._refresh()
        slots = np.unique(self._fix_slots(stored))
        slots = slots[slots >= 0]
        s = self._state
        found = slots[~s["held"][slots] & ~s["arrived"][slots]]
        return [self._routes[i].device for i in found.tolist()]

    def _fix_slots(self, stored: FixBatch) -> np.ndarray:
        """The slot of each fix's route, -1 for none; computed once for the
        ``unheld`` and ``evaluate`` of a batch while no route comes or goes."""
        last = self._last
        if last is not None and last[0] is stored and last[1] == self._generation:
            return last[2]
        names, inverse = np.unique(stored.device.astype(str), return_inverse=True)
        slot_of_name = np.array(
            [self._slots.get((stored.tenant, n), -1) for n in names.tolist()],
            dtype=np.int64,
        )
        slot = slot_of_name[inverse]
        self._last = (stored, self._generation, slot)
        return slot

    def restore(self, tenant: str, device: str, saved: Mapping[str, Any]) -> bool:
        """Take a saved state of the device's route when it covers later fixes
        than the state here; False when it does not."""
        slot = self._slots.get((tenant, device))
        if slot is None:
            return False
        self._refresh()
        if int(saved["last_ms"]) <= int(self._state["last_ms"][slot]):
            return False
        for name in SAVED_FIELDS:
            self._state[name][slot] = saved[name]
        return True

    def hold(self, tenant: str, device: str, held: bool) -> None:
        """Mark the device as held by this process (its fixes come here), or not."""
        slot = self._slots.get((tenant, device))
        if slot is not None:
            self._refresh()
            self._state["held"][slot] = held

    def take_changed(
        self, keys: list[tuple[str, str]] | None = None
    ) -> tuple[list[PlannedRoute], dict[str, np.ndarray]]:
        """The routes whose state changed since they were last taken (or those of
        ``keys``, changed or not), their saved fields and their ``total_m``; marks
        them unchanged."""
        self._refresh()
        s = self._state
        if keys is None:
            slots = np.flatnonzero(s["dirty"])
        else:
            slots = np.array(
                [self._slots[k] for k in keys if k in self._slots], dtype=np.int64
            )
        s["dirty"][slots] = False
        routes = [self._routes[i] for i in slots.tolist()]
        saved = {name: s[name][slots] for name in SAVED_FIELDS}
        return routes, {**saved, "total_m": self._flat.total_m[slots]}

    def mark_changed(self, keys: list[tuple[str, str]]) -> None:
        """Mark these routes changed again (their save failed)."""
        self._refresh()
        for key in keys:
            slot = self._slots.get(key)
            if slot is not None:
                self._state["dirty"][slot] = True

    def clear_all(self) -> None:
        """Stop monitoring every device."""
        self._routes, self._parts, self._slots, self._new = [], [], {}, []
        self._generation += 1
        self._state = _empty_state(0)
        self._flat = _FlatRoutes.build([])
        self._stale = False

    def clear(self, tenant: str, device: str) -> bool:
        """Stop monitoring a device; False when it had no route."""
        slot = self._slots.pop((tenant, device), None)
        if slot is None:
            return False
        self._refresh()
        self._generation += 1
        keep = np.ones(len(self._routes), dtype=bool)
        keep[slot] = False
        del self._routes[slot]
        del self._parts[slot]
        self._state = {k: v[keep] for k, v in self._state.items()}
        self._slots = {(r.tenant, r.device): i for i, r in enumerate(self._routes)}
        self._stale = True
        return True

    def forget_arrived(
        self, before_ms: int, keep: Iterable[tuple[str, str]] = ()
    ) -> int:
        """Stop keeping the routes that arrived at a fix before ``before_ms``
        (retention), but for those not saved since and those of ``keep`` (tenant,
        device: their save is under way); the number forgotten."""
        self._refresh()
        s = self._state
        gone = s["arrived"] & (s["last_ms"] < before_ms) & ~s["dirty"]
        for key in keep:
            slot = self._slots.get(key)
            if slot is not None:
                gone[slot] = False
        if not gone.any():
            return 0
        self._generation += 1
        stay = ~gone
        self._routes = [r for r, k in zip(self._routes, stay, strict=True) if k]
        self._parts = [p for p, k in zip(self._parts, stay, strict=True) if k]
        self._state = {k: v[stay] for k, v in s.items()}
        self._slots = {(r.tenant, r.device): i for i, r in enumerate(self._routes)}
        self._stale = True
        return int(gone.sum())

    def _refresh(self) -> None:
        """Bring the state and the flat segment arrays up to the assigned routes."""
        if self._new:
            added = _empty_state(len(self._new))
            for i, saved in enumerate(self._new):
                for name, value in saved.items():
                    added[name][i] = value
            self._state = {
                k: np.concatenate([v, added[k]]) for k, v in self._state.items()
            }
            self._new = []
        if self._stale:
            self._flat = _FlatRoutes.build(self._parts)
            self._stale = False

    def progress(self, tenant: str, device: str) -> RouteProgress | None:
        slot = self._slots.get((tenant, device))
        if slot is None:
            return None
        self._refresh()
        s, flat = self._state, self._flat
        total = float(flat.total_m[slot])
        return RouteProgress(
            route_id=self._routes[slot].route_id,
            total_m=total,
            progress_m=float(s["progress_m"][slot]),
            remaining_m=max(total - float(s["progress_m"][slot]), 0.0),
            eta_ms=int(s["eta_ms"][slot]),
            off_route=bool(s["off"][slot]),
            deviation_m=float(s["deviation_m"][slot]),
            arrived=bool(s["arrived"][slot]),
            last_fix_ms=int(s["last_ms"][slot]),
        )

    def evaluate(self, stored: FixBatch, created_ms: int) -> list[TrackingEvent]:
        """Advance every monitored device of the batch; the events, in fix order.

        Each round changes the state of its devices; when a round raises, the
        state of the batch's devices is put back as it was before the first, so
        that a retry (``isolation``) raises each event once and skips no fix."""
        if not self._routes or len(stored) == 0:
            return []
        self._refresh()
        slot = self._fix_slots(stored)
        self._last = None  # the batch is done with
        rows = np.flatnonzero(slot >= 0)
        if len(rows) == 0:
            return []
        order = rows[np.lexsort((stored.seq[rows], stored.time_ms[rows], slot[rows]))]
        ordered_slots = slot[order]
        first = np.r_[True, ordered_slots[1:] != ordered_slots[:-1]]
        starts = np.flatnonzero(first)
        rank = np.arange(len(order)) - np.repeat(
            starts, np.diff(np.r_[starts, len(order)])
        )
        devices = ordered_slots[first]
        before = {name: values[devices] for name, values in self._state.items()}
        events: list[TrackingEvent] = []
        try:
            for k in range(int(rank.max()) + 1):
                picked = order[rank == k]
                events.extend(self._round(stored, picked, slot[picked], created_ms))
        except BaseException:
            for name, values in before.items():
                self._state[name][devices] = values
            raise
        return events

    def _round(
        self, stored: FixBatch, rows: np.ndarray, slots: np.ndarray, created_ms: int
    ) -> list[TrackingEvent]:
        cfg, s, flat = self.settings, self._state, self._flat
        time_ms = stored.time_ms[rows]
        fresh = (time_ms > s["last_ms"][slots]) & ~s["arrived"][slots]
        rows, slots, time_ms = rows[fresh], slots[fresh], time_ms[fresh]
        if len(rows) == 0:
            return []
        lat, lon = stored.lat[rows], stored.lon[rows]
        accuracy = np.nan_to_num(stored.accuracy_m[rows].astype(np.float64), nan=0.0)
        x, y = to_local(lat, lon, flat.lat0[slots], flat.lon0[slots])
        started = s["last_ms"][slots] > 0
        dt_s = np.where(started, (time_ms - s["last_ms"][slots]) / 1e3, 0.0)
        progress = s["progress_m"][slots]
        expected = np.minimum(
            progress + s["speed_mps"][slots] * dt_s, flat.total_m[slots]
        )

        # Where on the route: the window around the expected progress, unless the
        # device is new or off the route, where anything ahead that it could have
        # reached since it was last on the route may be where it is.
        wide = ~started | s["off"][slots]
        lo_m = np.maximum(progress - cfg.behind_m, 0.0)
        since_on_s = np.where(
            s["last_on_ms"][slots] > 0,
            (time_ms - s["last_on_ms"][slots]) / 1e3,
            np.inf,
        )
        reach_m = np.minimum(
            progress + np.maximum(cfg.min_ahead_m, since_on_s * cfg.max_speed_mps),
            flat.total_m[slots],
        )
        hi_m = np.where(
            wide,
            reach_m,
            progress + np.maximum(cfg.min_ahead_m, dt_s * cfg.max_speed_mps),
        )
        penalty = np.where(wide, WIDE_PENALTY, cfg.stray_penalty)
        deviation, along = flat.locate(slots, x, y, lo_m, hi_m, expected, penalty)
        miss = np.flatnonzero(~wide & (deviation > cfg.off_route_m))
        if len(miss):
            d2, a2 = flat.locate(
                slots[miss],
                x[miss],
                y[miss],
                lo_m[miss],
                reach_m[miss],
                expected[miss],
                np.full(len(miss), WIDE_PENALTY),
            )
            better = d2 < deviation[miss]
            deviation[miss[better]], along[miss[better]] = d2[better], a2[better]

        # Off or on, counted over consecutive fixes that can tell.
        telling = accuracy <= cfg.max_accuracy_m
        beyond = np.maximum(deviation - accuracy, 0.0) > cfg.off_route_m
        off_count = np.where(telling & beyond, s["off_count"][slots] + 1, 0)
        off_count = np.where(telling, off_count, s["off_count"][slots])
        on_count = np.where(telling & ~beyond, s["on_count"][slots] + 1, 0)
        on_count = np.where(telling, on_count, s["on_count"][slots])
        was_off = s["off"][slots]
        goes_off = ~was_off & (off_count >= cfg.off_route_fixes)
        comes_back = was_off & (on_count >= cfg.back_on_route_fixes)
        off = (was_off | goes_off) & ~comes_back
        on_route = telling & ~beyond

        # Progress, pace and ETA from fixes on the route.
        new_progress = np.where(on_route, along, progress)
        old_exp_s = flat.expected_s_at(slots, progress)
        new_exp_s = flat.expected_s_at(slots, new_progress)
        decay = np.exp(-dt_s / cfg.pace_half_life_s)
        pace_obs = s["pace_obs_s"][slots] * decay + np.where(on_route, dt_s, 0.0)
        pace_exp = s["pace_exp_s"][slots] * decay + np.where(
            on_route, np.maximum(new_exp_s - old_exp_s, 0.0), 0.0
        )
        pace = np.clip(
            np.where(pace_exp > 30.0, pace_obs / np.maximum(pace_exp, 1e-9), 1.0),
            0.5,
            4.0,
        )
        moved_m = np.maximum(new_progress - progress, 0.0)
        speed = np.where(
            on_route & (dt_s > 0),
            moved_m / np.maximum(dt_s, 1e-9),
            s["speed_mps"][slots],
        )
        remaining_s = flat.total_s[slots] - new_exp_s
        eta_ms = time_ms + (remaining_s * pace * 1e3).astype(np.int64)
        eta_ms = np.where(off, s["eta_ms"][slots], eta_ms)
        remaining_m = flat.total_m[slots] - new_progress
        near = cfg.arrival_radius_m + np.minimum(accuracy, cfg.arrival_radius_m)
        to_dest = np.hypot(x - flat.dest_x[slots], y - flat.dest_y[slots])
        # At the destination near the end of the route (not at the start of a loop).
        end_part = remaining_m <= np.maximum(4.0 * near, 0.1 * flat.total_m[slots])
        arrived = (to_dest <= near) & end_part
        eta_ms = np.where(arrived, time_ms, eta_ms)
        eta_step_ms = np.maximum(cfg.eta_change_s, cfg.eta_change_share * remaining_s)
        eta_moved = (
            ~off
            & ~arrived
            & (np.abs(eta_ms - s["announced_eta_ms"][slots]) > eta_step_ms * 1e3)
        )

        s["last_ms"][slots] = time_ms
        s["last_on_ms"][slots] = np.where(on_route, time_ms, s["last_on_ms"][slots])
        s["progress_m"][slots] = np.where(arrived, flat.total_m[slots], new_progress)
        s["deviation_m"][slots] = deviation
        s["off_count"][slots] = off_count
        s["on_count"][slots] = on_count
        s["off"][slots] = off & ~arrived
        s["arrived"][slots] = arrived
        s["pace_obs_s"][slots] = pace_obs
        s["pace_exp_s"][slots] = pace_exp
        s["speed_mps"][slots] = speed
        s["eta_ms"][slots] = eta_ms
        s["announced_eta_ms"][slots] = np.where(
            eta_moved, eta_ms, s["announced_eta_ms"][slots]
        )
        s["held"][slots] = True
        s["dirty"][slots] = True
        # Arriving closes an off-route stretch: BACK_ON_ROUTE, then ARRIVED.
        back = (comes_back & ~arrived) | (was_off & arrived)
        kinds = (
            (goes_off & ~arrived, EventType.OFF_ROUTE),
            (back, EventType.BACK_ON_ROUTE),
            (eta_moved, EventType.ETA_UPDATED),
            (arrived, EventType.ARRIVED),
        )
        events = []
        for i in np.flatnonzero(goes_off | back | eta_moved | arrived).tolist():
            for mask, kind in kinds:
                if mask[i]:
                    events.append(
                        self._event(stored, rows[i], slots[i], kind, created_ms)
                    )
        return events

    def _event(
        self,
        stored: FixBatch,
        row: int,
        slot: int,
        kind: EventType,
        created_ms: int,
    ) -> TrackingEvent:
        route = self._routes[slot]
        s = self._state
        time_ms = int(stored.time_ms[row])
        total = float(self._flat.total_m[slot])
        attributes = {
            "deviation_m": f"{s['deviation_m'][slot]:.1f}",
            "progress_m": f"{s['progress_m'][slot]:.1f}",
            "remaining_m": f"{max(total - s['progress_m'][slot], 0.0):.1f}",
            "eta_ms": str(int(s["eta_ms"][slot])),
        }
        return TrackingEvent(
            event_id=event_id(
                route.tenant, route.device, kind, time_ms, route.route_id
            ),
            tenant=route.tenant,
            device=route.device,
            type=kind,
            time_ms=time_ms,
            lat=float(stored.lat[row]),
            lon=float(stored.lon[row]),
            fix_seq=int(stored.seq[row]),
            created_ms=created_ms,
            route_id=route.route_id,
            attributes=attributes,
        )


def deviation_m(
    lat: np.ndarray, lon: np.ndarray, fix_lat: float, fix_lon: float
) -> float:
    """Distance from a point to a route's geometry (a single point route included)."""
    x, y = to_local(lat, lon, lat[0], lon[0])
    px, py = to_local(np.array([fix_lat]), np.array([fix_lon]), lat[0], lon[0])
    if len(x) == 1:
        return float(np.hypot(px[0] - x[0], py[0] - y[0]))
    distance, _ = project_on_segments(px, py, x[:-1], y[:-1], x[1:], y[1:])
    return float(distance.min())


def progress_of(route_id: str, saved: Mapping[str, Any]) -> RouteProgress:
    """The progress a saved state (one row of :func:`saved_states`) tells."""
    total, progress = float(saved["total_m"]), float(saved["progress_m"])
    return RouteProgress(
        route_id=route_id,
        total_m=total,
        progress_m=progress,
        remaining_m=max(total - progress, 0.0),
        eta_ms=int(saved["eta_ms"]),
        off_route=bool(saved["off"]),
        deviation_m=float(saved["deviation_m"]),
        arrived=bool(saved["arrived"]),
        last_fix_ms=int(saved["last_ms"]),
    )


def start_state(route: PlannedRoute, parts: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The saved fields (and ``total_m``) of a route not yet driven."""
    eta_ms = route.assigned_ms + int(parts["total_s"][0] * 1e3)
    empty = _empty_row()
    row = {name: empty[name] for name in SAVED_FIELDS}
    row.update(eta_ms=eta_ms, announced_eta_ms=eta_ms, total_m=parts["total_m"][0])
    return row


def _empty_state(n: int) -> dict[str, np.ndarray]:
    return {
        "last_ms": np.zeros(n, np.int64),
        "last_on_ms": np.zeros(n, np.int64),
        "progress_m": np.zeros(n),
        "deviation_m": np.zeros(n),
        "off_count": np.zeros(n, np.int64),
        "on_count": np.zeros(n, np.int64),
        "off": np.zeros(n, bool),
        "arrived": np.zeros(n, bool),
        "pace_obs_s": np.zeros(n),
        "pace_exp_s": np.zeros(n),
        "speed_mps": np.zeros(n),
        "eta_ms": np.zeros(n, np.int64),
        "announced_eta_ms": np.zeros(n, np.int64),
        "held": np.zeros(n, bool),  # this process applies the device's fixes
        "dirty": np.zeros(n, bool),  # changed since its last checkpoint
    }


def _empty_row() -> dict[str, Any]:
    return {k: v[0] for k, v in _empty_state(1).items()}


# What a checkpoint saves of a device's state (not this process's own marks).
SAVED_FIELDS = tuple(k for k in _empty_state(0) if k not in ("held", "dirty"))
SAVED_DTYPES = {k: v.dtype for k, v in _empty_state(0).items() if k in SAVED_FIELDS}


def route_parts(route: PlannedRoute) -> dict[str, np.ndarray]:
    """One route's segments in the local frame of its first point, and its totals
    (about a millisecond for 300 points, mostly the geodesic segment lengths)."""
    lat, lon = route.lat, route.lon
    if len(lat) == 1:
        lat, lon = np.repeat(lat, 2), np.repeat(lon, 2)
    x, y = to_local(lat, lon, lat[0], lon[0])
    length = segment_lengths_m(lat, lon)
    seconds = np.asarray(route.segment_expected_s, dtype=np.float64)
    if len(seconds) != len(length):
        seconds = np.zeros(len(length))
    return {
        "ax": x[:-1],
        "ay": y[:-1],
        "bx": x[1:],
        "by": y[1:],
        "start_m": np.r_[0.0, np.cumsum(length)[:-1]],
        "length_m": length,
        "start_s": np.r_[0.0, np.cumsum(seconds)[:-1]],
        "duration_s": seconds,
        "lat0": lat[:1],
        "lon0": lon[:1],
        "total_m": np.array([length.sum()]),
        "total_s": np.array([seconds.sum()]),
        "dest_x": x[-1:],
        "dest_y": y[-1:],
    }


@dataclass(frozen=True, slots=True)
class _FlatRoutes:
    """Segments of every route in one set of arrays; route r owns segments
    ``offset[r]:offset[r + 1]``, in the local frame of its first point."""

    offset: np.ndarray
    ax: np.ndarray
    ay: np.ndarray
    bx: np.ndarray
    by: np.ndarray
    start_m: np.ndarray
    length_m: np.ndarray
    start_s: np.ndarray
    duration_s: np.ndarray
    start_key: np.ndarray
    end_key: np.ndarray
    lat0: np.ndarray
    lon0: np.ndarray
    total_m: np.ndarray
    total_s: np.ndarray
    dest_x: np.ndarray
    dest_y: np.ndarray

    @classmethod
    def build(cls, parts: list[dict[str, np.ndarray]]) -> _FlatRoutes:
        """Join the per-route arrays of :func:`route_parts`, in slot order."""
        if not parts:
            empty = {k: np.zeros(0) for k in cls.__slots__}
            empty["offset"] = np.zeros(1, np.int64)
            return cls(**empty)
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        counts = np.array([len(p["length_m"]) for p in parts])
        route = np.repeat(np.arange(len(parts)), counts)
        arrays["offset"] = np.r_[0, np.cumsum(counts)].astype(np.int64)
        arrays["start_key"] = route * ROUTE_KEY_STRIDE_M + arrays["start_m"]
        arrays["end_key"] = arrays["start_key"] + arrays["length_m"]
        return cls(**arrays)

    def locate(
        self,
        slots: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        lo_m: np.ndarray,
        hi_m: np.ndarray,
        expected_m: np.ndarray,
        stray_penalty: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best place of each fix among its route's segments overlapping [lo, hi]."""
        base = slots * ROUTE_KEY_STRIDE_M
        first = np.searchsorted(self.end_key, base + lo_m, side="left")
        last = np.searchsorted(self.start_key, base + hi_m, side="right")
        first = np.clip(first, self.offset[slots], self.offset[slots + 1] - 1)
        last = np.clip(last, first + 1, self.offset[slots + 1])
        counts = last - first
        owner = np.repeat(np.arange(len(slots)), counts)
        seg = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        seg += np.repeat(first, counts)
        distance, t = project_on_segments(
            x[owner], y[owner], self.ax[seg], self.ay[seg], self.bx[seg], self.by[seg]
        )
        along = self.start_m[seg] + t * self.length_m[seg]
        score = distance + stray_penalty[owner] * np.abs(along - expected_m[owner])
        # Candidates of one fix are contiguous: the first of its lowest scores wins.
        lowest = np.minimum.reduceat(score, np.cumsum(counts) - counts)
        tied = np.flatnonzero(score == lowest[owner])
        best = tied[np.r_[True, owner[tied][1:] != owner[tied][:-1]]]
        return distance[best], along[best]

    def expected_s_at(self, slots: np.ndarray, along_m: np.ndarray) -> np.ndarray:
        """Expected seconds from the route's start to a place along it."""
        base = slots * ROUTE_KEY_STRIDE_M
        seg = np.searchsorted(self.end_key, base + along_m, side="left")
        seg = np.clip(seg, self.offset[slots], self.offset[slots + 1] - 1)
        length = self.length_m[seg]
        fraction = np.where(
            length > 0,
            (along_m - self.start_m[seg]) / np.where(length > 0, length, 1),
            0,
        )
        return self.start_s[seg] + np.clip(fraction, 0.0, 1.0) * self.duration_s[seg]
