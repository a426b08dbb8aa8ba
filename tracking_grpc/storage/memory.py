"""In-process live state: newest position per device in arrays, and a local broker.

Positions live in growable numpy columns, one slot per device, so nearby queries are a
single vectorised distance computation over the tenant's devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import fields

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.core.geodesy import haversine_m
from tracking_grpc.interest import Interest
from tracking_grpc.storage.base import CatchUp, UpdateHandler

log = logging.getLogger(__name__)

_COLUMNS = [f.name for f in fields(FixBatch) if f.name not in {"tenant", "device"}]


class _TenantPositions:
    """Newest fix per device of one tenant, in slot-indexed columns."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.slots: dict[str, int] = {}
        self.devices = np.empty(0, dtype=object)
        self.columns: dict[str, np.ndarray] = {}
        self.size = 0

    def _grow(self, template: FixBatch, needed: int) -> None:
        capacity = max(64, len(self.devices))
        while capacity < needed:
            capacity *= 2
        if capacity == len(self.devices):
            return
        devices = np.empty(capacity, dtype=object)
        devices[: self.size] = self.devices[: self.size]
        self.devices = devices
        for name in _COLUMNS:
            old = self.columns.get(name)
            column = np.zeros(capacity, dtype=getattr(template, name).dtype)
            if old is not None:
                column[: self.size] = old[: self.size]
            self.columns[name] = column

    def slots_for(self, devices: np.ndarray, template: FixBatch) -> np.ndarray:
        """Slot of each device, allocating slots for new devices."""
        index = np.empty(len(devices), dtype=np.intp)
        for i, device in enumerate(devices.tolist()):
            slot = self.slots.get(device)
            if slot is None:
                if self.size == len(self.devices):
                    self._grow(template, self.size + 1)
                slot = self.size
                self.slots[device] = slot
                self.devices[slot] = device
                self.columns["time_ms"][slot] = np.iinfo(np.int64).min
                self.size += 1
            index[i] = slot
        return index

    def remove(self, device: str) -> None:
        """Free the device's slot: the last slot's device moves into it."""
        slot = self.slots.pop(device, None)
        if slot is None:
            return
        last = self.size - 1
        if slot != last:
            moved = self.devices[last]
            self.devices[slot] = moved
            self.slots[moved] = slot
            for column in self.columns.values():
                column[slot] = column[last]
        self.devices[last] = None
        self.size = last

    def rows(self, slots: np.ndarray) -> FixBatch:
        arrays = {name: self.columns[name][slots] for name in _COLUMNS}
        return FixBatch(tenant=self.tenant, device=self.devices[slots], **arrays)


class MemoryLiveStore:
    """LiveStore kept in this process; rebuilt from history at start-up."""

    def __init__(self) -> None:
        self._tenants: dict[str, _TenantPositions] = {}

    def _tenant(self, tenant: str) -> _TenantPositions:
        positions = self._tenants.get(tenant)
        if positions is None:
            positions = self._tenants[tenant] = _TenantPositions(tenant)
        return positions

    async def update(self, batch: FixBatch) -> FixBatch:
        if len(batch) == 0:
            return batch
        newest = batch.take(batch.newest_per_device())
        positions = self._tenant(batch.tenant)
        if not positions.columns:
            positions._grow(newest, len(newest))
        slots = positions.slots_for(newest.device, newest)
        current = positions.columns["time_ms"][slots]
        advances = (newest.time_ms > current) | (
            (newest.time_ms == current) & (newest.seq > positions.columns["seq"][slots])
        )
        moved = newest.take(advances)
        target = slots[advances]
        for name in _COLUMNS:
            positions.columns[name][target] = getattr(moved, name)
        return moved

    async def get(self, tenant: str, devices: Sequence[str]) -> FixBatch:
        positions = self._tenants.get(tenant)
        if positions is None:
            return FixBatch.empty(tenant)
        slots = [positions.slots[d] for d in devices if d in positions.slots]
        return positions.rows(np.asarray(slots, dtype=np.intp))

    async def nearby(
        self, tenant: str, lat: float, lon: float, radius_m: float, limit: int
    ) -> tuple[FixBatch, np.ndarray]:
        positions = self._tenants.get(tenant)
        if positions is None or positions.size == 0:
            return FixBatch.empty(tenant), np.zeros(0)
        n = positions.size
        distance = haversine_m(
            positions.columns["lat"][:n], positions.columns["lon"][:n], lat, lon
        )
        inside = np.flatnonzero(distance <= radius_m)
        order = inside[np.argsort(distance[inside], kind="stable")][:limit]
        return positions.rows(order), distance[order]

    async def snapshot(self, tenant: str) -> FixBatch:
        positions = self._tenants.get(tenant)
        if positions is None or positions.size == 0:
            return FixBatch.empty(tenant)
        return positions.rows(np.arange(positions.size))

    async def remove(self, tenant: str, devices: Sequence[str]) -> None:
        positions = self._tenants.get(tenant)
        if positions is not None:
            for device in devices:
                positions.remove(device)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._tenants.clear()


class LocalBroker:
    """Broker for a single process: the handler is called directly, with every
    update (it filters for its watchers), so interest needs no bookkeeping."""

    def __init__(self) -> None:
        self._handler: UpdateHandler | None = None

    async def publish(self, updates: FixBatch, local: bool = True) -> None:
        if self._handler is None or not local:
            return
        try:
            await self._handler(updates)
        except Exception:
            log.exception("live update handler failed")

    async def subscribe(
        self,
        handler: UpdateHandler,
        interest: Callable[[], Interest],
        catch_up: CatchUp | None = None,
    ) -> None:
        """``catch_up`` is never called: nothing is lost between caller and handler."""
        if self._handler is not None:
            raise RuntimeError("a broker takes one subscription")
        self._handler = handler

    async def interest_changed(self) -> None:
        return None

    async def close(self) -> None:
        self._handler = None
