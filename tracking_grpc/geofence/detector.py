"""Enter, exit, dwell and cross detection over batches of fixes, as arrays.

Rules (docs/geofencing.md says them for users):

- A fix *enters* a fence when its position is inside and its accuracy is no worse
  than the fence's enter limit (the fence's ``max_accuracy_m``, or the radius of the
  largest circle that fits inside it).
- A fix *exits* only when it is certainly outside: its distance to the fence's edge
  exceeds both its accuracy and ``EXIT_MARGIN_M``. Other fixes keep the membership.
- DWELL is raised once per stay, by the first fix at least ``dwell_ms`` after the
  enter while still inside, or by the timer (``raise_due_dwells``, rule in
  dwell.py) when no such fix comes. CROSS is raised when the straight segment
  between two consecutive accurate fixes, both outside, passes through the fence.
- Fixes are evaluated per device in fix-time order. A fix not newer than the newest
  fix already evaluated for its device is late: it changes nothing and raises nothing.
- Outside its schedule a fence neither enters nor exits anybody.

Membership is kept per (device, fence) in sorted arrays; a batch is evaluated by
expanding (device, fence) pairs over the device's fixes and forward-filling decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import EventType, TrackingEvent, event_id
from tracking_grpc.geofence import dwell, schedule
from tracking_grpc.geofence.index import FenceIndex
from tracking_grpc.storage.fences import Membership

log = logging.getLogger(__name__)

EXIT_MARGIN_M = 5.0
_NEVER = np.iinfo(np.int64).min
_ORDER = {EventType.CROSS: 0, EventType.EXIT: 1, EventType.ENTER: 2, EventType.DWELL: 3}


@dataclass(slots=True)
class _Members:
    """Inside memberships: key = device code << 32 | fence code, sorted."""

    key: np.ndarray
    entered_ms: np.ndarray
    dwell_done: np.ndarray

    @classmethod
    def empty(cls) -> _Members:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, bool))

    def of_devices(self, devices: np.ndarray) -> np.ndarray:
        """Indices of the memberships of the given device codes."""
        start = np.searchsorted(self.key, devices.astype(np.int64) << 32)
        end = np.searchsorted(self.key, (devices.astype(np.int64) + 1) << 32)
        return _ranges(start, end)

    def replace_devices(
        self,
        devices: np.ndarray,
        key: np.ndarray,
        entered: np.ndarray,
        done: np.ndarray,
    ) -> None:
        drop = self.of_devices(devices)
        keep = np.ones(self.key.size, dtype=bool)
        keep[drop] = False
        merged_key = np.concatenate([self.key[keep], key])
        order = np.argsort(merged_key, kind="stable")
        entered_ms = np.concatenate([self.entered_ms[keep], entered])[order]
        dwell_done = np.concatenate([self.dwell_done[keep], done])[order]
        # Computed first, set together: a failure leaves the memberships whole.
        self.key, self.entered_ms, self.dwell_done = (
            merged_key[order],
            entered_ms,
            dwell_done,
        )

    def drop_fences(self, codes: np.ndarray) -> None:
        keep = ~np.isin(self.key & 0xFFFFFFFF, codes)
        self.key, self.entered_ms = self.key[keep], self.entered_ms[keep]
        self.dwell_done = self.dwell_done[keep]


@dataclass(slots=True)
class _Devices:
    """Per device code: newest evaluated fix, when it was received, and whether
    this process holds the device (see ``FenceDetector.unheld``)."""

    time_ms: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    accuracy_m: np.ndarray
    received_ms: np.ndarray
    seq: np.ndarray
    held: np.ndarray

    @classmethod
    def empty(cls) -> _Devices:
        none = np.empty(0, np.int64)
        nowhere = np.empty(0, bool)
        return cls(none, np.empty(0), np.empty(0), np.empty(0), none, none, nowhere)

    def grow(self, size: int) -> None:
        if size <= self.time_ms.size:
            return
        extra = max(size, 2 * self.time_ms.size) - self.time_ms.size
        self.time_ms = np.concatenate([self.time_ms, np.full(extra, _NEVER)])
        self.lon = np.concatenate([self.lon, np.full(extra, np.nan)])
        self.lat = np.concatenate([self.lat, np.full(extra, np.nan)])
        self.accuracy_m = np.concatenate([self.accuracy_m, np.full(extra, np.nan)])
        self.received_ms = np.concatenate([self.received_ms, np.zeros(extra, np.int64)])
        self.seq = np.concatenate([self.seq, np.zeros(extra, np.int64)])
        self.held = np.concatenate([self.held, np.zeros(extra, bool)])

    def clear(self, code: int) -> None:
        if code < self.time_ms.size:
            self.time_ms[code] = _NEVER
            self.unplace(np.array([code]))

    def unplace(self, codes: np.ndarray) -> None:
        """Forget the devices' newest position (and let them go); their newest
        fix time stays: fixes not newer are still late."""
        self.lon[codes] = self.lat[codes] = self.accuracy_m[codes] = np.nan
        self.received_ms[codes] = self.seq[codes] = 0
        self.held[codes] = False


class FenceDetector:
    """Geofence state of one tenant's devices; turns fix batches into events."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self._device_codes: dict[str, int] = {}
        self._device_names: list[str] = []
        self._fence_codes: dict[str, int] = {}
        self._index_rows: tuple[FenceIndex, np.ndarray, np.ndarray] | None = None
        self._members = _Members.empty()
        self._devices = _Devices.empty()
        # The last batch prepared for evaluation (unheld, then evaluate):
        # (batch, sorted by device and time, device names, device per fix, codes).
        self._prepared: (
            tuple[FixBatch, FixBatch, np.ndarray, np.ndarray, np.ndarray] | None
        ) = None

    def inside(self, device: str) -> list[str]:
        """Fence ids the device is inside now (for tests and Check)."""
        code = self._device_codes.get(device)
        if code is None:
            return []
        names = {c: f for f, c in self._fence_codes.items()}
        rows = self._members.of_devices(np.array([code]))
        return sorted(names[int(k) & 0xFFFFFFFF] for k in self._members.key[rows])

    def seed(self, memberships: list[Membership], restored_ms: int) -> None:
        """Start from stored memberships (after a restart); fixes not newer than a
        device's newest stored event count as late. The timer counts the silence of
        a restored device from ``restored_ms`` (when its last fix came is unknown),
        at the position of its ENTER."""
        if not memberships:
            return
        devices, key, entered, done = self._seeded(memberships, restored_ms)
        self._members.replace_devices(np.unique(devices), key, entered, done)

    def _seeded(
        self, memberships: list[Membership], restored_ms: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Set the devices' state from stored memberships (``seed``); their device
        codes and membership keys, ENTER times and DWELL flags, to be stored."""
        if not memberships:
            none = np.empty(0, np.int64)
            return none, none, none, np.empty(0, bool)
        devices = np.array([self._device_code(m.device) for m in memberships])
        fences = np.array([self._fence_code(m.fence_id) for m in memberships])
        state = self._devices
        state.grow(int(devices.max()) + 1)
        newest = np.array([m.last_event_ms for m in memberships], dtype=np.int64)
        np.maximum.at(state.time_ms, devices, newest)
        unplaced = np.isnan(state.lon[devices])
        at = devices[unplaced]
        state.lat[at] = np.array([m.lat for m in memberships])[unplaced]
        state.lon[at] = np.array([m.lon for m in memberships])[unplaced]
        state.seq[at] = np.array([m.fix_seq for m in memberships])[unplaced]
        state.received_ms[devices] = np.maximum(state.received_ms[devices], restored_ms)
        return (
            devices,
            (devices.astype(np.int64) << 32) | fences,
            np.array([m.entered_ms for m in memberships], dtype=np.int64),
            np.array([m.dwell_done for m in memberships], dtype=bool),
        )

    def unheld(self, batch: FixBatch) -> list[str]:
        """Devices of the batch this process does not hold: those whose fixes it
        has not evaluated since their memberships were loaded (or let go). Another
        process may have evaluated their later fixes. The batch's preparation is
        kept for its ``evaluate``, so this costs nearly nothing more."""
        _, names, _, codes = self._prepare(batch)
        self._devices.grow(int(codes.max()) + 1)
        return names[~self._devices.held[codes]].tolist()

    def holds(self, device: str) -> bool:
        code = self._device_codes.get(device)
        held = self._devices.held
        return code is not None and code < held.size and bool(held[code])

    def unprepare(self) -> None:
        """Keep no reference to a batch ``unheld`` prepared that is not evaluated."""
        self._prepared = None

    def hold(self, devices: list[str]) -> None:
        """This process evaluates the devices' fixes from now on."""
        codes = np.array([self._device_code(d) for d in devices], dtype=np.int64)
        if codes.size:
            self._devices.grow(int(codes.max()) + 1)
            self._devices.held[codes] = True

    def members(self) -> int:
        """How many memberships are kept (the cost of rebuilding them)."""
        return int(self._members.key.size)

    def late(self, batch: FixBatch, newest_ms: Mapping[str, int]) -> list[str]:
        """Devices of the batch (prepared by ``unheld``) none of whose fixes is
        newer than their time in ``newest_ms`` (their newest stored event)."""
        ordered, names, local, _ = self._prepare(batch)
        last = np.searchsorted(local, np.arange(names.size), side="right") - 1
        newest = ordered.time_ms[last]
        return [
            name
            for name, time_ms in zip(names.tolist(), newest.tolist(), strict=True)
            if name in newest_ms and time_ms <= newest_ms[name]
        ]

    def floor(self, devices: list[str], newest_ms: Mapping[str, int]) -> None:
        """Fixes of the devices not newer than their time in ``newest_ms`` (their
        newest stored event, maybe raised by another process) are late here."""
        named = [d for d in devices if d in newest_ms]
        if not named:
            return
        codes = np.array([self._device_code(d) for d in named], dtype=np.int64)
        self._devices.grow(int(codes.max()) + 1)
        times = np.array([newest_ms[d] for d in named], dtype=np.int64)
        np.maximum.at(self._devices.time_ms, codes, times)

    def reload(
        self,
        devices: list[str],
        memberships: list[Membership],
        newest_ms: Mapping[str, int],
        restored_ms: int,
    ) -> None:
        """Take the devices over: their memberships (and DWELL state) become those
        their stored events give, as after a restart (``seed``), in place of what
        this process had (one rebuild); then hold them. Fixes not newer than the
        newest fix evaluated here, or than the device's newest stored event
        (``newest_ms``, over all its fences: another process may have raised it),
        are late."""
        if not devices:
            return
        codes = np.array([self._device_code(d) for d in devices], dtype=np.int64)
        self._devices.grow(int(codes.max()) + 1)
        self._devices.unplace(codes)
        self.floor(devices, newest_ms)
        _, key, entered, done = self._seeded(memberships, restored_ms)
        self._members.replace_devices(codes, key, entered, done)
        self._devices.held[codes] = True

    def place(self, fixes: FixBatch) -> None:
        """Fixes the previous holder of their devices judged (one per device, just
        taken over: ``reload``): the segment to each device's next fix starts
        there (CROSS), and fixes not newer are late. A fix older than its
        device's time (its newest stored event: ``floor``) does not place it:
        the device was elsewhere since, so it stays unplaced."""
        if len(fixes) == 0:
            return
        codes = np.array([self._device_code(d) for d in fixes.device], np.int64)
        state = self._devices
        state.grow(int(codes.max()) + 1)
        fresh = fixes.time_ms.astype(np.int64) >= state.time_ms[codes]
        fixes, codes = fixes.take(fresh), codes[fresh]
        np.maximum.at(state.time_ms, codes, fixes.time_ms.astype(np.int64))
        state.lon[codes], state.lat[codes] = fixes.lon, fixes.lat
        state.accuracy_m[codes] = fixes.accuracy_m
        state.seq[codes] = fixes.seq.astype(np.int64)
        state.received_ms[codes] = fixes.received_ms

    def release(self, devices: list[str]) -> int:
        """Let devices another process took over go: drop their memberships (so
        the timer raises no DWELL for them) and their newest position; their next
        fix here reloads them. Returns how many memberships were dropped."""
        codes = np.array(
            [self._device_codes[d] for d in devices if d in self._device_codes],
            dtype=np.int64,
        )
        if codes.size == 0:
            return 0
        dropped = int(self._members.of_devices(np.unique(codes)).size)
        none = np.empty(0, np.int64)
        self._members.replace_devices(codes, none, none, np.empty(0, bool))
        self._devices.grow(int(codes.max()) + 1)
        self._devices.unplace(codes)
        return dropped

    def forget_fences(self, fence_ids: list[str]) -> None:
        """Drop memberships of deleted fences (their devices raise no exit)."""
        codes = [self._fence_codes[f] for f in fence_ids if f in self._fence_codes]
        if codes:
            self._members.drop_fences(np.array(codes, dtype=np.int64))

    def forget_device(self, device: str) -> int:
        """Drop the device's memberships and newest fix (erasure; no EXIT is
        raised); returns how many fences it was inside."""
        code = self._device_codes.get(device)
        if code is None:
            return 0
        rows = self._members.of_devices(np.array([code]))
        self._members.replace_devices(
            np.array([code]),
            np.empty(0, np.int64),
            np.empty(0, np.int64),
            np.empty(0, bool),
        )
        self._devices.clear(code)
        return int(rows.size)

    def dwell_pending(self) -> bool:
        """Whether any membership has not had its DWELL (cheap; the timer's test)."""
        return (
            bool(self._members.dwell_done.size) and not self._members.dwell_done.all()
        )

    def raise_due_dwells(
        self, index: FenceIndex, now_ms: int, lateness_ms: int, held_only: bool = False
    ) -> list[TrackingEvent]:
        """DWELL for every stay that reached its fence's ``dwell_ms`` without a fix
        saying so (the timer rule of dwell.py); each stay's DWELL is raised once,
        by a fix or by this. ``held_only``: of the devices held here only."""
        pending, row, device = self._due(index, now_ms, lateness_ms)
        if held_only:
            held = self._devices.held[device]
            pending, row, device = pending[held], row[held], device[held]
        if pending.size == 0:
            return []
        members, state = self._members, self._devices
        members.dwell_done[pending] = True
        newest = {
            "time_ms": state.time_ms[device],
            "lat": state.lat[device],
            "lon": state.lon[device],
            "accuracy_m": state.accuracy_m[device],
            "seq": state.seq[device],
        }
        return dwell.timer_events(
            self.tenant,
            [self._device_names[d] for d in device.tolist()],
            index.ids[row].tolist(),
            members.entered_ms[pending],
            index.dwell_ms[row],
            newest,
            now_ms,
        )

    def due_unheld(self, index: FenceIndex, now_ms: int, lateness_ms: int) -> list[str]:
        """Devices not held here with a DWELL due by the timer: another process
        may have seen their stay end (check the stored events first)."""
        _, _, device = self._due(index, now_ms, lateness_ms)
        device = np.unique(device)
        unheld = device[~self._devices.held[device]]
        return [str(self._device_names[d]) for d in unheld.tolist()]

    def refresh(self, devices: list[str], memberships: list[Membership]) -> None:
        """Replace the devices' memberships with the stored ones (one rebuild),
        keeping the rest of their state here (when their last fix came, for the
        timer)."""
        if not devices:
            return
        codes = np.array([self._device_code(d) for d in devices], dtype=np.int64)
        self._devices.grow(int(codes.max()) + 1)
        _, key, entered, done = self._seeded(memberships, 0)
        self._members.replace_devices(codes, key, entered, done)

    def _due(
        self, index: FenceIndex, now_ms: int, lateness_ms: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The memberships whose DWELL the timer raises now: their indices, their
        fences' index rows and their device codes."""
        members = self._members
        pending = np.flatnonzero(~members.dwell_done)
        none = np.empty(0, np.int64)
        if pending.size == 0 or len(index) == 0:
            return none, none, none
        _, code_to_row = self._rows_of(index)
        fence_code = members.key[pending] & 0xFFFFFFFF
        known = fence_code < code_to_row.size  # codes given after the index's
        row = np.full(pending.size, -1, dtype=np.int64)
        row[known] = code_to_row[fence_code[known]]
        live = row >= 0  # memberships of deleted fences wait for the next batch
        pending, row = pending[live], row[live]
        device = members.key[pending] >> 32
        entered = members.entered_ms[pending]
        state = self._devices
        due = dwell.overdue(
            entered,
            index.dwell_ms[row],
            state.time_ms[device],
            state.received_ms[device],
            now_ms,
            lateness_ms,
        )
        due &= index.emits[EventType.DWELL][row] & (entered != _NEVER)
        return pending[due], row[due], device[due]

    def evaluate(
        self, batch: FixBatch, index: FenceIndex, now_ms: int
    ) -> list[TrackingEvent]:
        """Events raised by a batch of stored fixes; updates the membership state."""
        if len(batch) == 0 or len(index) == 0:
            return []
        batch, _, local, codes = self._prepare(batch)
        self._prepared = None  # no reference kept to a batch evaluated
        self._devices.grow(int(codes.max()) + 1)
        fresh = batch.time_ms > self._devices.time_ms[codes[local]]
        if not fresh.all():
            log.debug("%d late fixes left out of fence evaluation", int((~fresh).sum()))
            batch, local = batch.take(fresh), local[fresh]
            if len(batch) == 0:
                return []
        fence_codes, _ = self._rows_of(index)
        run = _Run(self, batch, local, codes, index, fence_codes)
        events = run.events(now_ms)
        run.commit()
        return events

    def _prepare(
        self, batch: FixBatch
    ) -> tuple[FixBatch, np.ndarray, np.ndarray, np.ndarray]:
        """The batch sorted by device and time, its device names, the device of
        each fix (index into the names) and the names' codes."""
        kept = self._prepared
        if kept is not None and kept[0] is batch:
            return kept[1], kept[2], kept[3], kept[4]
        ordered = batch.sorted_by_device_time()
        names, local = np.unique(ordered.device.astype(str), return_inverse=True)
        codes = np.array([self._device_code(n) for n in names], dtype=np.int64)
        self._prepared = (batch, ordered, names, local, codes)
        return ordered, names, local, codes

    def _device_code(self, device: str) -> int:
        code = self._device_codes.setdefault(device, len(self._device_codes))
        if code == len(self._device_names):
            self._device_names.append(device)
        return code

    def _rows_of(self, index: FenceIndex) -> tuple[np.ndarray, np.ndarray]:
        """The index's fence codes by row, and its row by fence code (-1: none);
        kept while the index is the same."""
        if self._index_rows is None or self._index_rows[0] is not index:
            codes = np.array([self._fence_code(f) for f in index.ids], dtype=np.int64)
            code_to_row = np.full(len(self._fence_codes), -1, dtype=np.int64)
            code_to_row[codes] = np.arange(codes.size)
            self._index_rows = (index, codes, code_to_row)
        return self._index_rows[1], self._index_rows[2]

    def _fence_code(self, fence_id: str) -> int:
        return self._fence_codes.setdefault(fence_id, len(self._fence_codes))


class _Run:
    """One batch: rows are (device, fence) pairs times the device's fixes."""

    def __init__(
        self,
        detector: FenceDetector,
        batch: FixBatch,
        local: np.ndarray,
        codes: np.ndarray,
        index: FenceIndex,
        fence_codes: np.ndarray,
    ) -> None:
        self.d, self.batch, self.index = detector, batch, index
        self.fence_codes = fence_codes
        present, local = np.unique(local, return_inverse=True)
        self.codes = codes[present]  # device code per local device
        self.local = local  # local device per fix
        self.n_dev = self.codes.size
        self.first = np.searchsorted(local, np.arange(self.n_dev))
        self.stop = np.searchsorted(local, np.arange(self.n_dev), side="right")
        self.lon, self.lat = batch.lon, batch.lat
        self.time = batch.time_ms
        self.acc = np.nan_to_num(batch.accuracy_m.astype(np.float64), nan=0.0)
        self.c_fix, self.c_row = index.contains(self.lon, self.lat)
        self._pairs()
        self._decide()

    # pairs and rows -------------------------------------------------------------------

    def _pairs(self) -> None:
        """The (device, fence) pairs to judge: memberships held, fences hit by a fix."""
        n_rows = len(self.index) + 1
        member_key, entered, done = self._held(n_rows)
        touch_key = self.local[self.c_fix].astype(np.int64) * n_rows + self.c_row
        pair_key = np.unique(np.concatenate([member_key, touch_key]))
        self.pair_dev, self.pair_row = pair_key // n_rows, pair_key % n_rows
        at = np.searchsorted(member_key, pair_key)  # member_key.size: none held
        self.init_inside = np.append(member_key, -1)[at] == pair_key
        self.init_entered = np.append(entered, _NEVER)[at]
        self.init_done = np.append(done, False)[at]
        self._expand()

    def _held(self, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Memberships of the batch's devices in live fences, keyed by pair, sorted."""
        members = self.d._members
        held = members.of_devices(self.codes)
        fence_code = members.key[held] & 0xFFFFFFFF
        size = max(
            int(self.fence_codes.max(initial=-1)), int(fence_code.max(initial=-1))
        )
        code_to_row = np.full(size + 1, -1, dtype=np.int64)
        code_to_row[self.fence_codes] = np.arange(self.fence_codes.size)
        row = code_to_row[fence_code]
        alive = row >= 0  # memberships of deleted fences are dropped
        by_code = np.argsort(self.codes)
        device = by_code[np.searchsorted(self.codes[by_code], members.key[held] >> 32)]
        key = device[alive] * n_rows + row[alive]
        order = np.argsort(key)
        entered = members.entered_ms[held][alive]
        done = members.dwell_done[held][alive]
        return key[order], entered[order], done[order]

    def _expand(self) -> None:
        """One row per pair and fix of the pair's device, in fix-time order."""
        counts = self.stop[self.pair_dev] - self.first[self.pair_dev]
        self.r_pair = np.repeat(np.arange(self.pair_dev.size), counts)
        starts = np.cumsum(counts) - counts
        self.r_fix = self.first[self.pair_dev][self.r_pair] + (
            np.arange(self.r_pair.size) - starts[self.r_pair]
        )
        self.r_row = self.pair_row[self.r_pair]
        self.r_start = starts[self.r_pair]  # first row of the row's pair
        self.r_last = np.zeros(self.r_pair.size, dtype=bool)
        self.r_last[np.cumsum(counts) - 1] = True

    def _decide(self) -> None:
        index, fix, row = self.index, self.r_fix, self.r_row
        n_rows = len(index) + 1
        c_key = self.c_fix.astype(np.int64) * n_rows + self.c_row
        self.r_in = np.isin(fix.astype(np.int64) * n_rows + row, c_key)
        active = np.ones(row.size, dtype=bool)
        for r in np.unique(row[index.scheduled[row]]):
            mask = row == r
            active[mask] = schedule.active(
                index.fences[r].spec.schedule, self.time[fix[mask]]
            )
        acc = self.acc[fix]
        enter_ok = self.r_in & active & (acc <= index.enter_limits_m(row))
        could_be_in = self.init_inside | (
            np.bincount(self.r_pair, weights=enter_ok, minlength=self.pair_row.size) > 0
        )
        probe = np.flatnonzero(~self.r_in & active & could_be_in[self.r_pair])
        dist = index.edge_distance_m(
            self.lon[fix[probe]], self.lat[fix[probe]], row[probe]
        )
        exit_ok = np.zeros(row.size, dtype=bool)
        exit_ok[probe] = dist > np.maximum(acc[probe], EXIT_MARGIN_M)
        decision = np.where(enter_ok, 1, np.where(exit_ok, -1, 0))
        self.state = self._fill(decision, np.where(self.init_inside, 1, -1))
        self.prev = np.where(
            np.arange(row.size) == self.r_start,
            np.where(self.init_inside, 1, -1)[self.r_pair],
            np.roll(self.state, 1),
        )
        self.enter = (self.prev < 0) & (self.state > 0)
        self.exit = (self.prev > 0) & (self.state < 0)
        self._dwell()

    def _fill(self, decision: np.ndarray, initial: np.ndarray) -> np.ndarray:
        """Per pair, the latest decision at or before each row (else the initial)."""
        pos = np.arange(decision.size)
        latest = np.maximum.accumulate(np.where(decision != 0, pos, -1))
        own = latest >= self.r_start
        return np.where(own, decision[latest.clip(0)], initial[self.r_pair])

    def _dwell(self) -> None:
        time = self.time[self.r_fix]
        pos = np.arange(time.size)
        latest = np.maximum.accumulate(np.where(self.enter, pos, -1))
        own = latest >= self.r_start
        self.entered = np.where(
            own, time[latest.clip(0)], self.init_entered[self.r_pair]
        )
        stay = (
            np.cumsum(self.enter)
            - np.cumsum(self.enter)[self.r_start]
            + self.enter[self.r_start]
        )
        self.stay = stay  # 0 for the stay the batch began in
        dwell_ms = self.index.dwell_ms[self.r_row]
        due = (
            (self.state > 0)
            & (dwell_ms > 0)
            & (self.entered != _NEVER)
            & (time - self.entered >= dwell_ms)
            & ~((stay == 0) & self.init_done[self.r_pair])
        )
        first_due = np.zeros(time.size, dtype=bool)
        rows_due = np.flatnonzero(due)
        if rows_due.size:
            key = (
                self.r_pair[rows_due].astype(np.int64) * (time.size + 1)
                + stay[rows_due]
            )
            _, first = np.unique(key, return_index=True)
            first_due[rows_due[first]] = True
        self.dwell = first_due
        done_in_stay = np.maximum.accumulate(np.where(first_due, pos, -1))
        self.done = np.where(
            (done_in_stay >= self.r_start)
            & (stay[done_in_stay.clip(0)] == stay)
            & (done_in_stay >= 0),
            True,
            (stay == 0) & self.init_done[self.r_pair],
        )

    # events -----------------------------------------------------------------------

    def events(self, now_ms: int) -> list[TrackingEvent]:
        """The batch's events, per device in fix-time order."""
        emits, time = self.index.emits, self.time[self.r_fix]
        first = np.arange(time.size) == self.r_start
        entered_before = np.where(
            first, self.init_entered[self.r_pair], np.roll(self.entered, 1)
        )
        since = np.where(self.dwell, self.entered, entered_before)
        inside_ms = np.where(since != _NEVER, time - since, -1)
        found = [
            (np.flatnonzero(mask & emits[kind][self.r_row]), kind)
            for kind, mask in (
                (EventType.ENTER, self.enter),
                (EventType.EXIT, self.exit),
                (EventType.DWELL, self.dwell),
            )
        ]
        events = []
        for rows, kind in found:
            for r in rows.tolist():
                fix, row = int(self.r_fix[r]), int(self.r_row[r])
                attributes = self._attributes(fix)
                if kind != EventType.ENTER and inside_ms[r] >= 0:
                    attributes["inside_ms"] = str(int(inside_ms[r]))
                events.append(self._event(fix, row, kind, now_ms, attributes))
        cross_fix, cross_row = self._crossings()
        for fix, row in zip(cross_fix.tolist(), cross_row.tolist(), strict=True):
            attributes = self._attributes(fix)
            events.append(self._event(fix, row, EventType.CROSS, now_ms, attributes))
        events.sort(key=lambda e: (e.device, e.time_ms, e.fix_seq, _ORDER[e.type]))
        return events

    def _attributes(self, fix: int) -> dict[str, str]:
        accuracy = float(self.batch.accuracy_m[fix])
        return {} if np.isnan(accuracy) else {"accuracy_m": f"{accuracy:g}"}

    def _event(
        self, fix: int, row: int, kind: EventType, now_ms: int, attributes: dict
    ) -> TrackingEvent:
        device = str(self.batch.device[fix])
        fence = self.index.fences[row].spec
        time_ms = int(self.time[fix])
        return TrackingEvent(
            event_id=event_id(self.d.tenant, device, kind, time_ms, fence.fence_id),
            tenant=self.d.tenant,
            device=device,
            type=kind,
            time_ms=time_ms,
            lat=float(self.lat[fix]),
            lon=float(self.lon[fix]),
            fix_seq=int(self.batch.seq[fix]),
            created_ms=now_ms,
            fence_id=fence.fence_id,
            attributes=attributes,
        )

    def _crossings(self) -> tuple[np.ndarray, np.ndarray]:
        """(fix, row) where the segment ending at the fix passes through the fence."""
        index = self.index
        if not index.emits[EventType.CROSS].any():
            return np.empty(0, np.intp), np.empty(0, np.intp)
        devices = self.d._devices
        ends = np.arange(len(self.batch))
        starts = ends - 1
        first = starts < self.first[self.local]
        lon0 = np.where(first, devices.lon[self.codes[self.local]], self.lon[starts])
        lat0 = np.where(first, devices.lat[self.codes[self.local]], self.lat[starts])
        acc0 = np.where(
            first,
            np.nan_to_num(devices.accuracy_m[self.codes[self.local]]),
            self.acc[starts],
        )
        known = np.isfinite(lon0)
        segs, rows = index.crossed(
            lon0[known], lat0[known], self.lon[known], self.lat[known]
        )
        fixes = ends[known][segs]
        keep = index.emits[EventType.CROSS][rows]
        limit = index.enter_limits_m(rows)
        keep &= (self.acc[fixes] <= limit) & (acc0[fixes] <= limit)
        n_rows = len(index) + 1
        start_pts, start_rows = index.contains(lon0[fixes], lat0[fixes])
        candidates = np.arange(fixes.size, dtype=np.int64) * n_rows + rows
        keep &= ~np.isin(candidates, start_pts.astype(np.int64) * n_rows + start_rows)
        c_key = self.c_fix.astype(np.int64) * n_rows + self.c_row
        keep &= ~np.isin(fixes.astype(np.int64) * n_rows + rows, c_key)
        row_key = self.r_fix.astype(np.int64) * n_rows + self.r_row
        order = np.argsort(row_key)
        where = np.searchsorted(row_key[order], fixes.astype(np.int64) * n_rows + rows)
        where = where.clip(0, max(row_key.size - 1, 0))
        known_pair = row_key.size > 0
        if known_pair:
            match = row_key[order][where] == fixes.astype(np.int64) * n_rows + rows
            state_rows = order[where]
            was_in = match & (
                (self.state[state_rows] > 0) | (self.prev[state_rows] > 0)
            )
            keep &= ~was_in
        return fixes[keep], rows[keep]

    # state --------------------------------------------------------------------------

    def commit(self) -> None:
        """Store the batch's outcome: memberships and each device's newest fix.

        The only change a batch makes to the detector's state (besides naming new
        devices and fences), made once its events are out: a detector that raised
        on a batch is as it was before, and a retry of the batch (or of some of its
        devices, ``isolation``) raises each event once."""
        last = np.flatnonzero(self.r_last & (self.state > 0))
        key = (self.codes[self.pair_dev[self.r_pair[last]]] << 32) | self.fence_codes[
            self.r_row[last]
        ]
        newest = self.stop - 1
        fix = {
            "time_ms": self.time[newest],
            "lon": self.lon[newest],
            "lat": self.lat[newest],
            "accuracy_m": self.batch.accuracy_m[newest],
            "received_ms": self.batch.received_ms[newest],
            "seq": self.batch.seq[newest].astype(np.int64),
        }
        self.d._members.replace_devices(
            self.codes, key.astype(np.int64), self.entered[last], self.done[last]
        )
        devices = self.d._devices
        for name, values in fix.items():  # values computed above
            getattr(devices, name)[self.codes] = values


def judged_in_turn(fixes: FixBatch) -> np.ndarray:
    """Per fix (grouped by device), whether it was newer than every fix of its
    device received before it: the others were late when they came, and changed
    nothing where they were judged (a replay leaves them out)."""
    if len(fixes) == 0:
        return np.empty(0, bool)
    _, device = np.unique(fixes.device.astype(str), return_inverse=True)
    _, rank = np.unique(fixes.time_ms, return_inverse=True)
    order = np.lexsort((fixes.time_ms, fixes.received_ms, device))
    n = rank.size
    # Ranks offset by device: a running maximum that restarts at each device.
    key = device[order].astype(np.int64) * n + rank[order]
    before = np.concatenate([[-1], np.maximum.accumulate(key)[:-1]])
    newest_before = np.where(before // n == key // n, before, -1)
    judged = np.empty(n, bool)
    judged[order] = key > newest_before
    return judged


def _ranges(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Concatenated aranges [start[i], end[i])."""
    counts = end - start
    if counts.sum() == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(start, counts) + offsets
