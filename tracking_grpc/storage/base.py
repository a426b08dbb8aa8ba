"""Repository interfaces. Backends implement these; services depend only on them.

The history store is the source of truth: a fix is acknowledged only once
``HistoryStore.store`` has returned. Live state and fan-out can be rebuilt from it.
Every method takes the tenant explicitly; no backend mixes tenants.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.interest import Interest


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What the history store knows of one device."""

    device: str
    last_stored_seq: int
    last_time_ms: int


@dataclass(frozen=True, slots=True)
class Purged:
    """What a retention purge deleted from the history store."""

    fixes: int  # rows deleted one by one (not those of dropped partitions)
    partitions: int  # whole days dropped (PostgreSQL)
    # (tenant, device) whose every stored fix is gone: their state went too
    devices: list[tuple[str, str]]
    routes: int = 0  # arrived routes whose arrival fix is before the cutoff


@dataclass(frozen=True, slots=True)
class Checkpoints:
    """Saved live activity of some devices of one tenant (``activity.checkpoint``)."""

    tenant: str
    devices: list[str]
    applied_ms: np.ndarray  # per device: time of the newest fix applied
    states: list[bytes]  # per device: the packed state, opaque to the store

    def pieces(self, size: int) -> list[Checkpoints]:
        """These checkpoints in pieces of at most ``size`` devices."""
        return [
            Checkpoints(
                self.tenant,
                self.devices[first : first + size],
                self.applied_ms[first : first + size],
                self.states[first : first + size],
            )
            for first in range(0, len(self.devices), size)
        ]


@dataclass(frozen=True, slots=True)
class RouteCheckpoint:
    """Monitoring state of one device's assigned route (``routing.assignments``);
    the route is the one assigned as ``route_id`` at ``assigned_ms``."""

    tenant: str
    device: str
    route_id: str
    assigned_ms: int
    applied_ms: int  # fix time of the newest fix the state covers (0: none yet)
    state: bytes  # packed by the route monitor, opaque to the store
    ended: bool = False  # arrived: no longer monitored


@dataclass(frozen=True, slots=True)
class StoredRoute:
    """A route assigned to a device, as stored: its packed plan (the geometry and
    expected time of each segment) and its latest checkpoint."""

    plan: bytes
    checkpoint: RouteCheckpoint


def route_row(route: StoredRoute) -> tuple:
    """A stored route as a row: tenant, device, route_id, assigned_ms, plan,
    applied_ms, state, ended (the order of both backends' columns)."""
    c = route.checkpoint
    return (
        c.tenant,
        c.device,
        c.route_id,
        c.assigned_ms,
        route.plan,
        c.applied_ms,
        c.state,
        c.ended,
    )


def stored_route(row: Sequence) -> StoredRoute:
    """A row in the order of :func:`route_row` as a stored route."""
    tenant, device, route_id, assigned_ms, plan, applied_ms, state, ended = row
    checkpoint = RouteCheckpoint(
        tenant, device, route_id, assigned_ms, applied_ms, bytes(state), bool(ended)
    )
    return StoredRoute(bytes(plan), checkpoint)


class HistoryStore(Protocol):
    """Durable fixes and per-device state."""

    async def store(self, batch: FixBatch) -> np.ndarray:
        """Store a batch durably; returns a mask, True where the fix was new.

        A fix is a duplicate when its device already has a fix with the same
        sequence number or the same fix time. Device state is updated in the same
        transaction. Raises ``StorageUnavailable`` when nothing could be stored.
        """
        ...

    async def stored_as_received(self, batch: FixBatch) -> np.ndarray:
        """A mask, True where the fix is stored as received in this very submission:
        a row of its device with the same fix time, sequence number and receive time
        (``received_ms``).

        Only for a ``store`` retried after ``StorageUnavailable``: a resend is a
        later message, received later, so such a row was stored by an earlier try
        of the same batch whose answer was lost. Raises ``StorageUnavailable`` when
        the store cannot answer.
        """
        ...

    async def device_states(
        self, tenant: str, devices: Sequence[str]
    ) -> dict[str, DeviceState]: ...

    async def history(
        self,
        tenant: str,
        device: str,
        start_ms: int,
        end_ms: int,
        limit: int | None = None,
    ) -> FixBatch:
        """Fixes of one device with start_ms <= time_ms < end_ms, by fix time."""
        ...

    async def count(self, tenant: str, device: str | None = None) -> int: ...

    def newest_positions(self) -> AsyncIterator[FixBatch]:
        """Newest stored fix of every device of every tenant, in batches (rebuilds)."""
        ...

    async def erase_device(self, tenant: str, device: str) -> int:
        """Delete a device's fixes, state, activity checkpoint and assigned route;
        returns the number of fixes deleted."""
        ...

    async def purge_before(self, cutoff_ms: int) -> Purged:
        """Delete every fix of every tenant with time_ms < cutoff_ms, and the state
        of devices with no newer fix (their sequence numbers start afresh),
        activity checkpoints applied before the cutoff, and arrived routes whose
        arrival (the last fix their monitoring applied) is before the cutoff."""
        ...

    async def save_checkpoints(self, checkpoints: Checkpoints) -> None:
        """Upsert the devices' activity checkpoints in one write; a stored one
        applied later than the new one is kept (another process got further)."""
        ...

    async def load_checkpoints(
        self, tenant: str, devices: Sequence[str]
    ) -> Checkpoints:
        """The stored checkpoints of those of ``devices`` that have one."""
        ...

    async def erase_checkpoint(self, tenant: str, device: str) -> None:
        """Delete one device's checkpoint (``erase_device`` deletes it too)."""
        ...

    async def fixes_since(self, tenant: str, since_ms: Mapping[str, int]) -> FixBatch:
        """Each named device's fixes with time_ms >= its ``since_ms``, grouped by
        device, by fix time (activity restores)."""
        ...

    async def fixes_before(
        self,
        tenant: str,
        bounds: Mapping[str, tuple[int, int]],
        limit: int,
        recent_ms: int | None = None,
    ) -> FixBatch:
        """Each named device's newest ``limit`` fixes with ``start <= time_ms <
        end`` (its ``bounds``), grouped by device, by fix time (geofence
        take-overs: what the previous holder may not have judged yet). With
        ``recent_ms``, of those received before it only the newest (and none
        older than that one)."""
        ...

    async def assign_route(self, route: StoredRoute) -> None:
        """Store the device's assigned route, replacing any other it had."""
        ...

    async def save_route_checkpoints(
        self, checkpoints: Sequence[RouteCheckpoint]
    ) -> None:
        """Update the state of each device's route, in one write, where the stored
        route is the same assignment and its state covers no later fix; an ended
        route stays ended."""
        ...

    async def clear_route(self, tenant: str, device: str) -> bool:
        """Delete the device's assigned route; False when it had none."""
        ...

    async def routes(self, tenant: str, devices: Sequence[str]) -> list[StoredRoute]:
        """The stored routes (ended ones too) of those of ``devices`` that have one."""
        ...

    async def monitored_routes(
        self, after: tuple[str, str] | None = None, limit: int | None = None
    ) -> list[StoredRoute]:
        """Assigned routes of every tenant that have not ended (a start's load), by
        (tenant, device): those after ``after``, at most ``limit`` (one page)."""
        ...

    async def ping(self) -> None:
        """Raise ``StorageUnavailable`` unless the store answers."""
        ...

    async def close(self) -> None: ...


class LiveStore(Protocol):
    """Newest position of each device, for reads and nearby queries."""

    async def update(self, batch: FixBatch) -> FixBatch:
        """Apply stored fixes; returns the rows that became a device's newest fix.

        A fix older (by fix time) than the device's live position changes nothing,
        so the live position never moves backwards.
        """
        ...

    async def get(self, tenant: str, devices: Sequence[str]) -> FixBatch: ...

    async def nearby(
        self, tenant: str, lat: float, lon: float, radius_m: float, limit: int
    ) -> tuple[FixBatch, np.ndarray]:
        """Devices within radius_m of a point, nearest first, with distances in m."""
        ...

    async def snapshot(self, tenant: str) -> FixBatch:
        """Every live position of the tenant (for watch snapshots)."""
        ...

    async def remove(self, tenant: str, devices: Sequence[str]) -> None:
        """Forget the devices' live positions (erasure, retention)."""
        ...

    async def ping(self) -> None:
        """Raise ``Unavailable`` unless the store answers."""
        ...

    async def close(self) -> None: ...


UpdateHandler = Callable[[FixBatch], Awaitable[None]]
CatchUp = Callable[[], Awaitable[None]]


class Broker(Protocol):
    """Carries live updates to the server processes whose watchers want them."""

    async def publish(self, updates: FixBatch, local: bool = True) -> None:
        """Called once the updates' live write has completed; ``local`` false
        leaves out this process's own watchers (they were offered the updates
        already)."""
        ...

    async def subscribe(
        self,
        handler: UpdateHandler,
        interest: Callable[[], Interest],
        catch_up: CatchUp | None = None,
    ) -> None:
        """Call ``handler`` with published batches, from any process, holding at
        least the rows ``interest()`` wants (the handler filters exactly). A broker
        that can lose its subscription calls ``catch_up`` once it is back and
        routed by ``interest()`` again: what was published meanwhile is lost."""
        ...

    async def interest_changed(self) -> None:
        """Returns once every publish that starts later routes by ``interest()`` as
        it is now."""
        ...

    async def close(self) -> None: ...
