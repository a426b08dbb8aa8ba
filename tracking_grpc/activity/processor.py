"""Live activity: events from fixes as they are stored, and each device's state.

:class:`ActivityProcessor` is a :class:`~tracking_grpc.events.FixProcessor`. Per
tenant it keeps a short tail of recent fixes of each device and, per batch, runs
:func:`~tracking_grpc.activity.track.analyse` over tail plus new fixes for all
devices at once. Rows whose activity has become *final* are applied in order:
they move the odometer and the Kalman filter and raise MOTION_CHANGED,
STOP_STARTED/ENDED, TRIP_STARTED/ENDED and OVERSPEED_STARTED/ENDED. ONLINE is
raised on a device's first fix after silence; ``tick`` raises OFFLINE.

Fixes older than a device's newest applied fix are stored but do not change its
activity (history queries see them).

With a history store, the state survives the process (``activity.checkpoint``):
``save_checkpoints`` writes the devices that changed, and a device met for the first
time (a fix, or ``current``) is restored from its checkpoint: the stored fixes up
to the checkpoint's newest applied fix refill its tail, and those after it are
applied as new (after a crash, again: their events keep their ``event_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tracking_grpc.activity.checkpoint import KALMAN_FIELDS, Codec
from tracking_grpc.activity.groups import Groups, previous_where, runs
from tracking_grpc.activity.motion import Motion, settle
from tracking_grpc.activity.params import ActivityConfig, ActivityParams
from tracking_grpc.activity.smooth import KalmanFilter
from tracking_grpc.activity.tail import Tail
from tracking_grpc.activity.track import Analysis, analyse
from tracking_grpc.core import chunks
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import ActivityDetail, EventType, TrackingEvent, event_id
from tracking_grpc.storage.base import Checkpoints, HistoryStore

log = logging.getLogger(__name__)

NO_TRIP, CANDIDATE, ACTIVE = 0, 1, 2
INLINE_FIXES = 500  # larger batches are analysed in a worker thread
SAVE_PIECE_DEVICES = 250  # devices per checkpoint write
RESTORE_DEVICES = 2_000  # devices restored per read of checkpoints and fixes
MOTION_NAMES = {m: m.name.lower() for m in Motion}


@dataclass(frozen=True, slots=True)
class DeviceActivity:
    """What the processor knows of one device now."""

    device: str
    online: bool
    last_seen_ms: int
    motion: Motion
    in_stop: bool
    stop_since_ms: int
    in_trip: bool
    trip_since_ms: int
    trip_distance_m: float
    odometer_m: float
    time_ms: int  # newest applied fix
    lat: float
    lon: float
    smoothed_lat: float
    smoothed_lon: float


_COLUMNS = {
    "last_ms": (np.int64, -1),
    "seen_ms": (np.int64, -1),
    "online": (bool, False),
    "lat": (np.float64, np.nan),
    "lon": (np.float64, np.nan),
    "seq": (np.int64, 0),
    "in_stop": (bool, False),
    "stop_ms": (np.int64, -1),
    "trip": (np.int8, NO_TRIP),
    "trip_ms": (np.int64, -1),
    "trip_lat": (np.float64, np.nan),
    "trip_lon": (np.float64, np.nan),
    "trip_seq": (np.int64, 0),
    "trip_m": (np.float64, 0.0),
    "trip_top": (np.float64, 0.0),
    "odometer": (np.float64, 0.0),
    "motion": (np.int8, Motion.UNKNOWN),
    "over": (bool, False),
    "over_ms": (np.int64, -1),
    "over_top": (np.float64, 0.0),
    "smooth_lat": (np.float64, np.nan),
    "smooth_lon": (np.float64, np.nan),
}
CHECKPOINT_VERSION = 1  # raise when _COLUMNS or the Kalman filter's state change
_CODEC = Codec(CHECKPOINT_VERSION, _COLUMNS)


@dataclass
class _Tenant:
    params: ActivityParams
    slots: dict[str, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # per slot; "" for a free one
    free: list[int] = field(default_factory=list)  # slots emptied, given out first
    cols: dict[str, np.ndarray] = field(default_factory=dict)
    kalman: KalmanFilter = field(default_factory=KalmanFilter)
    tail: Tail = field(default_factory=Tail)  # recent fixes of every device
    # Per slot: changed since its checkpoint was last saved.
    dirty: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    # Per device restored for a call that raised: the stored fixes after its
    # checkpoint, kept for a retry of that call's fixes (``_with_restored``).
    replays: dict[str, FixBatch] = field(default_factory=dict)

    def slot_of(
        self, devices: np.ndarray, added: list[int] | None = None
    ) -> np.ndarray:
        """Slots of device ids (one lookup per distinct device), new ones given
        (a free slot first) and listed in ``added``."""
        unique, inverse = np.unique(devices.astype(str), return_inverse=True)
        out = np.empty(unique.size, dtype=np.intp)
        for i, name in enumerate(unique.tolist()):
            slot = self.slots.get(name)
            if slot is None:
                if self.free:
                    slot = self.free.pop()
                    self.names[slot] = name
                else:
                    slot = len(self.names)
                    self.names.append(name)
                self.slots[name] = slot
                if added is not None:
                    added.append(slot)
            out[i] = slot
        self._grow(len(self.names))
        return out[inverse]

    def _grow(self, size: int) -> None:
        have = len(next(iter(self.cols.values()))) if self.cols else 0
        if size <= have:
            return
        size = max(size, 2 * have, 64)
        for name, (dtype, fill) in _COLUMNS.items():
            extra = np.full(size - have, fill, dtype=dtype)
            self.cols[name] = np.concatenate([self.cols.get(name, extra[:0]), extra])
        self.dirty = np.concatenate([self.dirty, np.zeros(size - have, dtype=bool)])
        self.kalman.grow(size)

    def checkpoints(self, tenant: str) -> Checkpoints:
        """Checkpoints of the slots changed since their last, which are marked
        saved. A device that has applied no fix yet (its fixes wait for a stop
        to be ruled in or out) is saved for its tail."""
        slots = np.flatnonzero(self.dirty[: len(self.names)])
        tail_ms = self.tail.first_time_ms(slots)
        has_state = (self.cols["last_ms"][slots] >= 0) | (tail_ms >= 0)
        slots, tail_ms = slots[has_state], tail_ms[has_state]
        self.dirty[slots] = False
        kalman = {name: getattr(self.kalman, name)[slots] for name in KALMAN_FIELDS}
        states = _CODEC.pack(
            {name: self.cols[name][slots] for name in _COLUMNS}, tail_ms, kalman
        )
        names = [self.names[s] for s in slots.tolist()]
        return Checkpoints(tenant, names, self.cols["last_ms"][slots].copy(), states)

    def install(self, names: list[str], records: np.ndarray, now_ms: int) -> None:
        """Take devices' state from checkpoint records; a device silent for
        ``offline_after_s`` comes back offline."""
        slots = self.slot_of(np.array(names, dtype=object))
        for name in _COLUMNS:
            self.cols[name][slots] = records[name]
        for name in KALMAN_FIELDS:
            getattr(self.kalman, name)[slots] = records[f"kalman_{name}"]
        silent = (
            self.cols["seen_ms"][slots] < now_ms - self.params.offline_after_s * 1e3
        )
        self.cols["online"][slots[silent]] = False

    def hold(self, replay: FixBatch) -> None:
        """Keep each device's rows of ``replay`` for a retry (``replays``)."""
        if len(replay) == 0:
            return
        replay = replay.sorted_by_device_time()
        names, first = np.unique(replay.device.astype(str), return_index=True)
        ends = np.append(first[1:], len(replay))
        for name, start, end in zip(names.tolist(), first, ends, strict=True):
            self.replays[name] = replay.take(np.arange(start, end))


@dataclass(frozen=True, slots=True)
class _Before:
    """The state of a batch's devices before a call changes it, put back when the
    call raises: the call changes it in steps (ONLINE, then the applied rows one
    device and one row at a time, the Kalman filter, the tails), and a retry of a
    partly applied batch would find its first fixes applied (their events lost)
    and the devices online (their ONLINE lost). Taking it costs a copy of the
    columns of the batch's devices; the tails are the ones the call reads anyway."""

    slots: np.ndarray  # of the batch's devices, distinct and sorted
    new: np.ndarray  # slots given by the call: dropped
    cols: dict[str, np.ndarray]
    kalman: dict[str, np.ndarray]
    dirty: np.ndarray
    tail: FixBatch | None
    tail_slot: np.ndarray

    @classmethod
    def take(cls, state: _Tenant, slots: np.ndarray, new: np.ndarray) -> _Before:
        tail, tail_slot = state.tail.take(slots)
        return cls(
            slots,
            new,
            {name: column[slots] for name, column in state.cols.items()},
            {name: getattr(state.kalman, name)[slots] for name in KALMAN_FIELDS},
            state.dirty[slots],
            tail,
            tail_slot,
        )

    def put_back(self, processor: ActivityProcessor, tenant: str) -> None:
        state = processor._tenants[tenant]
        slots = self.slots
        for name, values in self.cols.items():
            state.cols[name][slots] = values
        for name, values in self.kalman.items():
            getattr(state.kalman, name)[slots] = values
        state.dirty[slots] = self.dirty
        tail = self.tail if self.tail is not None else FixBatch.empty(tenant)
        state.tail.replace(slots, tail, self.tail_slot)
        for slot in self.new.tolist():
            processor._drop(tenant, state.names[slot])


@dataclass(frozen=True, slots=True)
class _Work:
    """A batch's fixes behind its devices' tails, ready for ``analyse``."""

    state: _Tenant
    involved: np.ndarray  # slots of the batch's devices
    fixes: FixBatch  # sorted by slot, then time
    row_slot: np.ndarray

    @property
    def params(self) -> ActivityParams:
        return self.state.params


class ActivityProcessor:
    """Activity events for every tenant; see the module docstring."""

    name = "activity"

    def __init__(
        self, config: ActivityConfig | None = None, store: HistoryStore | None = None
    ) -> None:
        self.config = config or ActivityConfig()
        self.store = store  # of checkpoints and the fixes restores read; or none
        self._tenants: dict[str, _Tenant] = {}
        self._applying = asyncio.Lock()
        self._saving = asyncio.Lock()
        # Devices being erased (``drop_device`` to ``erase_checkpoint``), with
        # how many erasures of each: their stored checkpoints are neither
        # restored nor written again meanwhile.
        self._erasing: dict[tuple[str, str], int] = {}

    def _tenant(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(self.config.params(tenant))
        return state

    async def process(self, stored: FixBatch) -> list[TrackingEvent]:
        """``apply``; a large batch is analysed in a worker thread, which reads
        only its arguments, while the event loop serves streams. One batch at a
        time: the devices' tails are taken before and kept after the analysis."""
        async with self._applying:
            replay = FixBatch.empty(stored.tenant)
            if self.store is not None:
                stored, replay = await self._with_restored(stored)
            return await self._replaying(stored, replay)

    async def _replaying(
        self, batch: FixBatch, replay: FixBatch
    ) -> list[TrackingEvent]:
        """``_process``; ``replay`` holds the rows of ``batch`` of the devices
        restored for it. When the call raises, these devices keep the state their
        checkpoints gave (put back), and their rows are held for a retry of the
        call's fixes (``_with_restored``): neither read again nor applied by a
        call that brings newer fixes of them (the failed ones are left out)."""
        try:
            return await self._process(batch)
        except BaseException:
            self._tenant(batch.tenant).hold(replay)
            raise

    async def _process(self, stored: FixBatch) -> list[TrackingEvent]:
        """Events of ``stored``; a call that raises leaves the state of the
        batch's devices as it was (``_Before``), so that a retry of its fixes
        (``isolation``) raises each of their events once and skips none."""
        if len(stored) == 0:
            return []
        created_ms = _now_ms()
        with self._changing(stored, created_ms) as (events, work):
            if work is None:
                return events
            args = (work.fixes, work.params, False, work.row_slot)
            if len(work.fixes) <= INLINE_FIXES:
                analysis = analyse(*args)
            else:
                analysis = await asyncio.to_thread(analyse, *args)
            return events + self._finish(work, analysis, created_ms)

    async def restore(self, tenant: str, devices: list[str]) -> list[TrackingEvent]:
        """Restore devices this process holds nothing of from their checkpoints;
        the events of the fixes stored after each checkpoint."""
        async with self._applying:
            state = self._tenant(tenant)
            unknown = [d for d in devices if d not in state.slots]
            replay, _ = await self._restore(state, tenant, unknown)
            return await self._replaying(replay, replay)

    async def current(self, tenant: str, device: str) -> DeviceActivity | None:
        """``state``; for a device this process holds nothing of, its activity as
        restored from its checkpoint and the fixes stored since. That view is not
        kept: the process that receives the device's fixes moves it on."""
        held = self.state(tenant, device)
        if held is not None or self.store is None:
            return held
        view = ActivityProcessor(self.config, self.store)
        view._erasing = self._erasing
        await view.restore(tenant, [device])
        await view.tick(_now_ms())
        return view.state(tenant, device)

    async def save_checkpoints(self, pause_s: float = 0.0) -> int:
        """Save the state of every device changed since its last checkpoint, in
        writes of at most ``SAVE_PIECE_DEVICES`` devices ``pause_s`` apart;
        returns the number of devices saved.

        In pieces, a round of 10,000 devices never holds a database core for the
        130-160 ms one statement takes, while the group commits of acks wait."""
        if self.store is None:
            return 0
        async with self._saving:
            async with self._applying:
                taken = [s.checkpoints(t) for t, s in self._tenants.items() if s.cols]
            pieces = [p for c in taken for p in c.pieces(SAVE_PIECE_DEVICES)]
            saved = 0
            for n, piece in enumerate(pieces):
                if n and pause_s:
                    await asyncio.sleep(pause_s)
                if self._erasing:
                    piece = self._without_erasing(piece)
                try:
                    if piece.devices:
                        await self.store.save_checkpoints(piece)
                except Exception:
                    for unsaved in pieces[n:]:  # the next round tries again
                        self._mark_changed(unsaved)
                    raise
                saved += len(piece.devices)
            return saved

    def _without_erasing(self, piece: Checkpoints) -> Checkpoints:
        """``piece`` without the devices being erased, taken maybe before their
        state was dropped (so not written back); they are marked changed, so
        that a state they have from later fixes (new data) is saved next."""
        keep = [(piece.tenant, d) not in self._erasing for d in piece.devices]
        if all(keep):
            return piece
        rows = [i for i, kept in enumerate(keep) if kept]
        skipped = [d for d, kept in zip(piece.devices, keep, strict=True) if not kept]
        self._mark_devices_changed(piece.tenant, skipped)
        return Checkpoints(
            piece.tenant,
            [piece.devices[i] for i in rows],
            piece.applied_ms[rows],
            [piece.states[i] for i in rows],
        )

    async def _load_checkpoints(self, tenant: str, devices: list[str]) -> Checkpoints:
        """The stored checkpoints of ``devices``, but for those being erased."""
        assert self.store is not None
        if self._erasing:
            devices = [d for d in devices if (tenant, d) not in self._erasing]
        return await self.store.load_checkpoints(tenant, devices)

    def _mark_changed(self, checkpoints: Checkpoints) -> None:
        self._mark_devices_changed(checkpoints.tenant, checkpoints.devices)

    def _mark_devices_changed(self, tenant: str, devices: list[str]) -> None:
        state = self._tenants.get(tenant)
        if state is None:
            return
        slots = [state.slots.get(d) for d in devices]
        state.dirty[[s for s in slots if s is not None]] = True

    async def _with_restored(self, stored: FixBatch) -> tuple[FixBatch, FixBatch]:
        """``stored`` with the devices met for the first time, or back from
        another process, restored: their rows replaced by their stored fixes
        after the checkpoint (which include the batch's; any older ones stay, as
        late fixes); and those of the devices whose rows a held replay has
        (``_Tenant.replays``), replaced by it. Then the rows of these devices (to
        hold if the call raises)."""
        state = self._tenant(stored.tenant)
        devices = stored.device.astype(str)
        names = np.unique(devices)
        slots = np.array([state.slots.get(d, -1) for d in names.tolist()], np.intp)
        known = slots >= 0
        unknown = names[~known].tolist()
        if known.any():
            offline = names[known][~state.cols["online"][slots[known]]].tolist()
            unknown += await self._moved_on(state, stored.tenant, offline)
        replay, restored = await self._restore(state, stored.tenant, unknown)
        held, retried = _held_replays(state, stored, devices)
        if not restored and not retried:
            return stored, replay
        restoring = np.isin(devices, restored)
        applied = state.cols["last_ms"][state.slot_of(stored.device[restoring])]
        late = np.zeros(len(stored), dtype=bool)
        late[restoring] = stored.time_ms[restoring] <= applied
        ours = FixBatch.concat([stored.take(late), replay, held])
        keep = ~restoring & ~np.isin(devices, retried)
        batch = FixBatch.concat([stored.take(keep), ours]).sorted_by_device_time()
        return batch, ours

    async def _moved_on(
        self, state: _Tenant, tenant: str, devices: list[str]
    ) -> list[str]:
        """Of devices back after going offline here, or about to go offline
        here, those another process has applied later fixes of (so says their
        checkpoint): their state here is dropped, to be restored."""
        if not devices or self.store is None:
            return []
        saved = await self._load_checkpoints(tenant, devices)
        applied = dict(zip(saved.devices, saved.applied_ms.tolist(), strict=True))
        moved = [
            d
            for d in devices
            if applied.get(d, -1) > state.cols["last_ms"][state.slots[d]]
        ]
        for device in moved:
            self._drop(tenant, device)
        return moved

    async def _restore(
        self, state: _Tenant, tenant: str, devices: list[str]
    ) -> tuple[FixBatch, list[str]]:
        """Install the checkpoints of ``devices`` (read a few thousand at a time)
        and refill their tails, once every read has succeeded (a failed restore
        leaves them unknown, for the retry); the stored fixes to apply and the
        devices restored."""
        assert self.store is not None
        read = []
        for start in range(0, len(devices), RESTORE_DEVICES):
            chunk = devices[start : start + RESTORE_DEVICES]
            saved = await self._load_checkpoints(tenant, chunk)
            records = _CODEC.unpack(saved.states)
            last_ms, tail_ms = records["last_ms"], records["tail_ms"]
            since = np.where(tail_ms >= 0, tail_ms, last_ms)
            since = np.where(last_ms >= 0, np.minimum(since, last_ms), since)
            usable = (records["version"] == CHECKPOINT_VERSION) & (since >= 0)
            if not usable.any():
                continue
            names = [d for d, ok in zip(saved.devices, usable, strict=True) if ok]
            records, since = records[usable], since[usable]
            fixes = await self.store.fixes_since(
                tenant, dict(zip(names, since.tolist(), strict=True))
            )
            read.append((names, records, fixes))
        replays, restored = [FixBatch.empty(tenant)], []
        for names, records, fixes in read:
            state.install(names, records, _now_ms())
            replays.append(_refill_tails(state, names, fixes))
            restored += names
        if restored:
            log.info("restored the activity of %d devices of %s", len(restored), tenant)
        return FixBatch.concat(replays), restored

    async def tick(self, now_ms: int) -> list[TrackingEvent]:
        """OFFLINE for every online device silent for ``offline_after_s``, but for
        those another process has applied later fixes of (the device reconnected
        there): their state here is dropped instead, so that listeners hear no
        OFFLINE of a device online elsewhere. Only a tick that finds silent
        devices waits for a batch being applied."""
        events = []
        for tenant, state in list(self._tenants.items()):
            if state.cols and _silent(state, now_ms).size:
                async with self._applying:
                    events += await self._offline(tenant, state, now_ms)
        return events

    async def _offline(
        self, tenant: str, state: _Tenant, now_ms: int
    ) -> list[TrackingEvent]:
        silent = _silent(state, now_ms)
        try:
            await self._moved_on(
                state, tenant, [state.names[s] for s in silent.tolist()]
            )
        except Exception as exc:  # an OFFLINE too many beats one lost
            log.warning("checking where silent devices went failed (%s)", exc)
        c = state.cols
        silent = silent[c["online"][silent]]  # a dropped slot is reset
        c["online"][silent] = False
        return [
            _event(
                tenant,
                state.names[slot],
                EventType.OFFLINE,
                now_ms,
                c["lat"][slot],
                c["lon"][slot],
                int(c["seq"][slot]),
                now_ms,
                {"last_seen_ms": str(int(c["seen_ms"][slot]))},
            )
            for slot in silent.tolist()
        ]

    def state(self, tenant: str, device: str) -> DeviceActivity | None:
        """The device's current activity, or None if it sent nothing since start."""
        state = self._tenants.get(tenant)
        slot = state.slots.get(device) if state else None
        if state is None or slot is None:
            return None
        c = state.cols
        return DeviceActivity(
            device=device,
            online=bool(c["online"][slot]),
            last_seen_ms=int(c["seen_ms"][slot]),
            motion=Motion(int(c["motion"][slot])),
            in_stop=bool(c["in_stop"][slot]),
            stop_since_ms=int(c["stop_ms"][slot]),
            in_trip=int(c["trip"][slot]) == ACTIVE,
            trip_since_ms=int(c["trip_ms"][slot]) if c["trip"][slot] == ACTIVE else -1,
            trip_distance_m=float(c["trip_m"][slot]) if c["trip"][slot] else 0.0,
            odometer_m=float(c["odometer"][slot]),
            time_ms=int(c["last_ms"][slot]),
            lat=float(c["lat"][slot]),
            lon=float(c["lon"][slot]),
            smoothed_lat=float(c["smooth_lat"][slot]),
            smoothed_lon=float(c["smooth_lon"][slot]),
        )

    async def drop_device(self, tenant: str, device: str) -> bool:
        """Erasure, between two processor runs: drop the device's state here
        (False when there was none; its slot is emptied and given to the next
        device met) without waiting for a checkpoint round under way. Until
        ``erase_checkpoint``, its stored checkpoint is not restored, and a
        round under way does not write it again."""
        key = (tenant, device)
        self._erasing[key] = self._erasing.get(key, 0) + 1
        async with self._applying:
            return self._drop(tenant, device)

    async def erase_checkpoint(self, tenant: str, device: str) -> None:
        """The end of ``drop_device``: once no checkpoint round is under way,
        erase the device's stored checkpoint."""
        key = (tenant, device)
        try:
            if self.store is not None:
                async with self._saving:  # no checkpoint of it is being written
                    await self.store.erase_checkpoint(tenant, device)
        finally:
            left = self._erasing.pop(key, 1) - 1
            if left:
                self._erasing[key] = left

    def _drop(self, tenant: str, device: str) -> bool:
        state = self._tenants.get(tenant)
        slot = state.slots.pop(device, None) if state else None
        if state is None or slot is None:
            return False
        for name, (_, fill) in _COLUMNS.items():
            state.cols[name][slot] = fill
        state.dirty[slot] = False
        state.kalman.reset(slot)
        slots = np.array([slot], dtype=np.intp)
        state.tail.replace(slots, FixBatch.empty(tenant), slots[:0])
        state.names[slot] = ""
        state.free.append(slot)
        state.replays.pop(device, None)
        return True

    def apply(self, stored: FixBatch, created_ms: int) -> list[TrackingEvent]:
        """Events of newly stored fixes of one tenant (any order); like
        ``process``, a call that raises leaves the devices' state as it was."""
        if len(stored) == 0:
            return []
        with self._changing(stored, created_ms) as (events, work):
            if work is None:
                return events
            analysis = analyse(work.fixes, work.params, False, work.row_slot)
            return events + self._finish(work, analysis, created_ms)

    @contextlib.contextmanager
    def _changing(
        self, stored: FixBatch, created_ms: int
    ) -> Iterator[tuple[list[TrackingEvent], _Work | None]]:
        """``_prepare`` of a batch (a device met for the first time gets a slot);
        the state of the batch's devices is put back as it was before (``_Before``)
        when the block raises."""
        state = self._tenant(stored.tenant)
        added: list[int] = []
        slots = state.slot_of(stored.device, added)
        before = _Before.take(state, np.unique(slots), np.array(added, np.intp))
        try:
            yield self._prepare(state, stored, slots, before, created_ms)
        except BaseException:
            before.put_back(self, stored.tenant)
            raise

    def _prepare(
        self,
        state: _Tenant,
        stored: FixBatch,
        new_slot: np.ndarray,
        before: _Before,
        created_ms: int,
    ) -> tuple[list[TrackingEvent], _Work | None]:
        """ONLINE events, and what ``analyse`` must look at: the new fixes that
        are not late, behind their devices' tails, in device and time order."""
        state.dirty[new_slot] = True
        events = self._online(state, stored, new_slot, created_ms)
        # Late fixes (older than what a device has applied) stay out of activity.
        fresh = stored.time_ms > state.cols["last_ms"][new_slot]
        involved, tail, tail_slot = before.slots, before.tail, before.tail_slot
        if not fresh.all():
            stored, new_slot = stored.take(fresh), new_slot[fresh]
            if len(stored) == 0:
                return events, None
            involved = np.unique(new_slot)
            if tail is not None:
                taken = np.isin(tail_slot, involved)
                tail, tail_slot = tail.take(taken), tail_slot[taken]

        # Only the tails of devices in this batch take part.
        fixes, slots = stored, new_slot
        if tail is not None and len(tail):
            fixes = FixBatch.concat([tail, stored])
            slots = np.concatenate([tail_slot, new_slot])
        order = np.lexsort((fixes.seq, fixes.time_ms, slots))
        work = _Work(state, involved, fixes.take(order), slots[order])
        return events, work

    def _finish(self, work: _Work, a: Analysis, created_ms: int) -> list[TrackingEvent]:
        """Applies the rows ``a`` has made final and keeps the devices' tails."""
        state, fixes, row_slot = work.state, work.fixes, work.row_slot
        rows = np.flatnonzero(
            a.final & (fixes.time_ms > state.cols["last_ms"][row_slot])
        )
        events = []
        if rows.size:
            events = _Apply(state, self.config, a, row_slot, rows, created_ms).run()
        keep = _keep_tail(a, row_slot, state)
        state.tail.replace(work.involved, fixes.take(keep), row_slot[keep])
        return events

    def _online(
        self, state: _Tenant, stored: FixBatch, slots: np.ndarray, created_ms: int
    ) -> list[TrackingEvent]:
        seen = np.where(stored.received_ms > 0, stored.received_ms, stored.time_ms)
        c = state.cols
        newest = np.full(len(state.names), -1, dtype=np.int64)
        np.maximum.at(newest, slots, seen)
        touched = np.flatnonzero(newest >= 0)
        c["seen_ms"][touched] = np.maximum(c["seen_ms"][touched], newest[touched])
        waking = touched[~c["online"][touched]]
        c["online"][waking] = True
        events = []
        last_row = {int(s): i for i, s in enumerate(slots.tolist())}
        for slot in waking.tolist():
            i = last_row[slot]
            events.append(
                _event(
                    stored.tenant,
                    state.names[slot],
                    EventType.ONLINE,
                    int(stored.time_ms[i]),
                    float(stored.lat[i]),
                    float(stored.lon[i]),
                    int(stored.seq[i]),
                    created_ms,
                    {},
                )
            )
        return events


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _held_replays(
    state: _Tenant, stored: FixBatch, devices: np.ndarray
) -> tuple[FixBatch, list[str]]:
    """The held replays of the devices of ``stored`` whose fixes in it they all
    hold (a retry of a call that raised), and those devices. A held replay of a
    device with newer fixes is dropped: the call it was held for is over."""
    if not state.replays:
        return FixBatch.empty(stored.tenant), []
    names, inverse = np.unique(devices, return_inverse=True)
    newest = np.zeros(names.size, dtype=stored.seq.dtype)
    np.maximum.at(newest, inverse, stored.seq)
    held, retried = [FixBatch.empty(stored.tenant)], []
    for name, seq in zip(names.tolist(), newest.tolist(), strict=True):
        replay = state.replays.pop(name, None)
        if replay is not None and seq <= int(replay.seq.max()):
            held.append(replay)
            retried.append(name)
    return FixBatch.concat(held), retried


def _refill_tails(state: _Tenant, names: list[str], fixes: FixBatch) -> FixBatch:
    """Make the stored fixes of restored devices up to their newest applied fix
    their tails; returns the later ones, to apply."""
    slots = state.slot_of(np.array(names, dtype=object))
    if len(fixes) == 0:
        state.tail.replace(slots, fixes, np.empty(0, dtype=np.intp))
        return fixes
    fix_slot = state.slot_of(fixes.device)
    applied = fixes.time_ms <= state.cols["last_ms"][fix_slot]
    order = np.lexsort((fixes.seq, fixes.time_ms, fix_slot))
    applied_order = order[applied[order]]
    state.tail.replace(slots, fixes.take(applied_order), fix_slot[applied_order])
    return fixes.take(order[~applied[order]])


def _silent(state: _Tenant, now_ms: int) -> np.ndarray:
    """Slots of the online devices silent for ``offline_after_s``."""
    c = state.cols
    limit = now_ms - int(state.params.offline_after_s * 1000)
    return np.flatnonzero(c["online"] & (c["seen_ms"] >= 0) & (c["seen_ms"] < limit))


def _event(
    tenant,
    device,
    kind,
    time_ms,
    lat,
    lon,
    seq,
    created_ms,
    attributes,
    detail: ActivityDetail | None = None,
) -> TrackingEvent:
    return TrackingEvent(
        event_id=event_id(tenant, device, kind, int(time_ms), "activity"),
        tenant=tenant,
        device=device,
        type=kind,
        time_ms=int(time_ms),
        lat=float(lat),
        lon=float(lon),
        fix_seq=int(seq),
        created_ms=created_ms,
        attributes=attributes,
        activity=detail,
    )


THIN_STOP_MS = 30_000  # parked fixes kept for stop windows: one per 30 s


def _keep_tail(a: Analysis, row_slot: np.ndarray, state: _Tenant) -> np.ndarray:
    """Mask of rows later batches still need.

    Undecided rows; the last minute or so (motion and overspeed windows); the
    last trusted fix before that (steps); and rows a later fix may still join into
    a stop window, up to ``min_stop_s`` back, of which fixes already inside a stop
    are thinned to one per 30 s (their box is all a new window needs).
    """
    p = state.params
    short_s = max(p.motion_window_s, p.motion_min_s, p.overspeed_min_s) + 10.0
    long_s = p.min_stop_s + 60.0
    f = a.fixes
    newest = np.full(int(row_slot.max()) + 1, np.iinfo(np.int64).min)
    np.maximum.at(newest, row_slot, f.time_ms)
    age = newest[row_slot] - f.time_ms
    recent = age <= short_s * 1000
    bucket = f.time_ms // THIN_STOP_MS
    first_in_bucket = np.ones(len(f), dtype=bool)
    first_in_bucket[1:] = (bucket[1:] != bucket[:-1]) | (row_slot[1:] != row_slot[:-1])
    window = a.open_region & (age <= long_s * 1000) & (~a.in_stop | first_in_bucket)
    keep = (a.trusted | a.pending) & (~a.final | recent | window)
    # The trusted fix before each device's first kept row anchors its next step.
    n = len(f)
    first_kept = np.minimum.reduceat(np.where(keep, np.arange(n), n), a.groups.starts)
    first_kept = first_kept[first_kept < n]
    anchor = previous_where(a.trusted, a.groups)[first_kept]
    keep[anchor[anchor >= 0]] = True
    return keep


class _Apply:
    """Applies the newly final rows of one batch to the tenant's device state."""

    def __init__(self, state, config, a: Analysis, row_slot, rows, created_ms: int):
        self.state, self.config, self.a = state, config, a
        self.created_ms = created_ms
        self.p = state.params
        self.c = state.cols
        f = a.fixes
        self.tenant = f.tenant
        self.r = rows
        self.slot = row_slot[rows]
        self.t = f.time_ms[rows]
        self.lat, self.lon, self.seq = f.lat[rows], f.lon[rows], f.seq[rows]
        self.in_stop = a.in_stop[rows]
        self.gap = a.gap[rows]
        self.counted = a.counted_m[rows]
        self.speed = a.steps.speed_mps[rows]
        self.motion, self.over, self.over_ms = self._motion_and_overspeed(row_slot)
        self.events: list[TrackingEvent] = []

    def _motion_and_overspeed(self, row_slot):
        a, p, c = self.a, self.p, self.c
        trusted = np.flatnonzero(a.trusted)
        groups = Groups.of(a.groups.index[trusted])
        slot_of_group = row_slot[trusted][groups.starts]
        t = a.fixes.time_ms[trusted]
        settled = settle(
            a.motion[trusted], t, groups, p.motion_min_s, c["motion"][slot_of_group]
        )
        limits = self.state_limits(slot_of_group)[groups.index]
        speed = a.steps.speed_mps[trusted]
        over = (limits > 0) & (np.nan_to_num(speed) > limits)
        starts, ends = runs(over, groups)
        since = np.repeat(t[starts], ends - starts)
        confirmed = over & (t - since >= p.overspeed_min_s * 1000.0)
        position = np.searchsorted(trusted, self.r)
        return settled[position], confirmed[position], since[position]

    def state_limits(self, slots: np.ndarray) -> np.ndarray:
        names = [self.state.names[s] for s in slots.tolist()]
        return self.config.speed_limits_mps(self.tenant, names)

    def run(self) -> list[TrackingEvent]:
        c, slot = self.c, self.slot
        first = np.append(True, slot[1:] != slot[:-1])
        starts = np.flatnonzero(first)
        ends = np.append(starts[1:], slot.size)
        prev_stop = np.append(False, self.in_stop[:-1])
        prev_stop[first] = c["in_stop"][slot[first]]
        prev_motion = np.append(0, self.motion[:-1])
        prev_motion[first] = c["motion"][slot[first]]
        changes = (self.in_stop != prev_stop) | (self.gap & ~self.in_stop)
        changes |= self.motion != prev_motion
        changes |= self.over | c["over"][slot]
        changes |= ~self.in_stop & (c["trip"][slot] != ACTIVE)
        busy_run = np.logical_or.reduceat(changes, starts)

        # Quiet devices: accumulate in bulk.
        quiet = np.repeat(~busy_run, ends - starts)
        q_slots = slot[starts[~busy_run]]
        sums = np.add.reduceat(self.counted, starts)[~busy_run]
        c["odometer"][q_slots] += sums
        in_trip = c["trip"][q_slots] != NO_TRIP
        c["trip_m"][q_slots] += np.where(in_trip, sums, 0.0)
        moving_speed = np.where(quiet & ~self.in_stop, np.nan_to_num(self.speed), 0.0)
        tops = np.maximum.reduceat(moving_speed, starts)[~busy_run]
        c["trip_top"][q_slots] = np.where(
            in_trip, np.maximum(c["trip_top"][q_slots], tops), c["trip_top"][q_slots]
        )
        self._set_last(q_slots, ends[~busy_run] - 1)

        # Devices with something happening: one row at a time.
        for k in np.flatnonzero(busy_run).tolist():
            for i in range(starts[k], ends[k]):
                self._row(i)
        self._smooth()
        return self.events

    def _set_last(self, slots, i) -> None:
        c = self.c
        c["last_ms"][slots] = self.t[i]
        c["lat"][slots] = self.lat[i]
        c["lon"][slots] = self.lon[i]
        c["seq"][slots] = self.seq[i]

    def _emit(self, kind, i_or_place, attributes=None, detail=None) -> None:
        if isinstance(i_or_place, tuple):
            time_ms, lat, lon, seq = i_or_place
        else:
            i = i_or_place
            time_ms, lat, lon, seq = self.t[i], self.lat[i], self.lon[i], self.seq[i]
        s = self._current
        self.events.append(
            _event(
                self.tenant,
                self.state.names[s],
                kind,
                time_ms,
                lat,
                lon,
                seq,
                self.created_ms,
                attributes or {},
                detail,
            )
        )

    def _previous(self, s) -> tuple:
        c = self.c
        return (int(c["last_ms"][s]), c["lat"][s], c["lon"][s], int(c["seq"][s]))

    def _trip_place(self, s) -> tuple:
        c = self.c
        return (
            int(c["trip_ms"][s]),
            c["trip_lat"][s],
            c["trip_lon"][s],
            int(c["trip_seq"][s]),
        )

    def _begin_candidate(self, s, place, distance_m: float) -> None:
        c = self.c
        c["trip"][s] = CANDIDATE
        c["trip_ms"][s], c["trip_lat"][s], c["trip_lon"][s], c["trip_seq"][s] = place
        c["trip_m"][s] = distance_m
        c["trip_top"][s] = 0.0

    def _end_trip(self, s, place) -> None:
        c = self.c
        if c["trip"][s] == ACTIVE:
            duration_s = (place[0] - c["trip_ms"][s]) / 1000.0
            distance = float(c["trip_m"][s])
            self._emit(
                EventType.TRIP_ENDED,
                place,
                {"trip_started_ms": str(int(c["trip_ms"][s]))},
                ActivityDetail(
                    distance_m=distance,
                    duration_s=duration_s,
                    avg_speed_mps=distance / duration_s if duration_s > 0 else 0.0,
                    max_speed_mps=float(c["trip_top"][s]),
                    since_ms=int(c["trip_ms"][s]),
                    odometer_m=float(c["odometer"][s]),
                ),
            )
        c["trip"][s] = NO_TRIP

    def _row(self, i: int) -> None:
        c, p = self.c, self.p
        s = self._current = int(self.slot[i])
        stop_now, stop_before = bool(self.in_stop[i]), bool(c["in_stop"][s])
        c["odometer"][s] += self.counted[i]
        if c["trip"][s] != NO_TRIP:
            c["trip_m"][s] += self.counted[i]
            if not stop_now and np.isfinite(self.speed[i]):
                c["trip_top"][s] = max(c["trip_top"][s], float(self.speed[i]))
        here = (int(self.t[i]), self.lat[i], self.lon[i], int(self.seq[i]))

        if stop_now and not stop_before:
            self._emit(
                EventType.STOP_STARTED,
                i,
                {},
                ActivityDetail(odometer_m=float(c["odometer"][s])),
            )
            self._end_trip(s, here)
            c["in_stop"][s], c["stop_ms"][s] = True, self.t[i]
        elif stop_before and not stop_now:
            left = self._previous(s)
            duration_s = (left[0] - c["stop_ms"][s]) / 1000.0
            self._emit(
                EventType.STOP_ENDED,
                left,
                {},
                ActivityDetail(duration_s=duration_s, since_ms=int(c["stop_ms"][s])),
            )
            c["in_stop"][s] = False
            if self.gap[i]:
                self._begin_candidate(s, here, 0.0)
            else:
                self._begin_candidate(s, left, float(self.counted[i]))
        elif not stop_now and self.gap[i]:
            self._end_trip(s, self._previous(s))
            self._begin_candidate(s, here, 0.0)
        elif not stop_now and c["trip"][s] == NO_TRIP:
            self._begin_candidate(s, here, 0.0)

        if (
            c["trip"][s] == CANDIDATE
            and c["trip_m"][s] >= p.min_trip_distance_m
            and self.t[i] - c["trip_ms"][s] >= p.min_trip_s * 1000.0
        ):
            c["trip"][s] = ACTIVE
            self._emit(
                EventType.TRIP_STARTED,
                self._trip_place(s),
                {},
                ActivityDetail(odometer_m=float(c["odometer"][s])),
            )

        motion = int(self.motion[i])
        if motion != c["motion"][s]:
            before = int(c["motion"][s])
            if before != Motion.UNKNOWN and motion != Motion.UNKNOWN:
                self._emit(
                    EventType.MOTION_CHANGED,
                    i,
                    {"motion": MOTION_NAMES[Motion(motion)]},
                    ActivityDetail(
                        motion=motion,
                        previous_motion=before,
                        speed_mps=_finite(self.speed[i]),
                    ),
                )
            c["motion"][s] = motion

        if self.over[i] and not c["over"][s]:
            c["over"][s], c["over_ms"][s] = True, self.over_ms[i]
            c["over_top"][s] = float(self.speed[i])
            limit = float(self.state_limits(np.array([s]))[0])
            self._emit(
                EventType.OVERSPEED_STARTED,
                i,
                {},
                ActivityDetail(
                    speed_mps=float(self.speed[i]),
                    speed_limit_mps=limit,
                    since_ms=int(self.over_ms[i]),
                ),
            )
        elif c["over"][s]:
            speed = _finite(self.speed[i])
            limit = float(self.state_limits(np.array([s]))[0])
            if speed > limit > 0:
                c["over_top"][s] = max(c["over_top"][s], speed)
            else:
                c["over"][s] = False
                self._emit(
                    EventType.OVERSPEED_ENDED,
                    i,
                    {},
                    ActivityDetail(
                        max_speed_mps=float(c["over_top"][s]),
                        speed_limit_mps=limit,
                        since_ms=int(c["over_ms"][s]),
                        duration_s=(self.t[i] - c["over_ms"][s]) / 1000.0,
                    ),
                )
        self._set_last(np.array([s]), np.array([i]))

    def _smooth(self) -> None:
        """Kalman filter over the applied rows: one step per rank, all devices."""
        f = self.a.fixes
        acc = f.accuracy_m[self.r].astype(np.float64)
        rank = chunks.ranks(self.slot)
        by_rank = np.argsort(rank, kind="stable")  # each rank's rows in row order
        bounds = np.searchsorted(rank[by_rank], np.arange(int(rank.max()) + 2))
        for k in range(int(rank.max()) + 1):
            rows = by_rank[bounds[k] : bounds[k + 1]]
            s = self.slot[rows]
            lat, lon = self.state.kalman.step(
                s, self.t[rows], self.lat[rows], self.lon[rows], acc[rows]
            )
            self.c["smooth_lat"][s] = lat
            self.c["smooth_lon"][s] = lon


def _finite(value) -> float:
    value = float(value)
    return value if np.isfinite(value) else 0.0
