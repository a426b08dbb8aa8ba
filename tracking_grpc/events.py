"""Events raised about devices, and the bus that carries them to every consumer.

Processors (geofencing, activity, route monitoring) look at newly stored fixes and
return events; the ingest pipeline hands those to the :class:`EventBus`, whose
listeners deliver them (device streams, ``WatchEvents`` subscribers, the event store,
Redis Streams). :class:`EventType` mirrors ``tracking.v1.EventType`` value for value.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.observability import metrics

log = logging.getLogger(__name__)


class EventType(enum.IntEnum):
    ENTER = 1
    EXIT = 2
    DWELL = 3
    CROSS = 4
    MOTION_CHANGED = 20
    TRIP_STARTED = 21
    TRIP_ENDED = 22
    STOP_STARTED = 23
    STOP_ENDED = 24
    ONLINE = 25
    OFFLINE = 26
    OVERSPEED_STARTED = 27
    OVERSPEED_ENDED = 28
    OFF_ROUTE = 40
    BACK_ON_ROUTE = 41
    ARRIVED = 42
    ETA_UPDATED = 43


@dataclass(frozen=True, slots=True)
class ActivityDetail:
    """Values of an activity event (``tracking.v1.ActivityDetail``); 0 when unset."""

    motion: int = 0  # tracking_grpc.activity.motion.Motion
    previous_motion: int = 0
    distance_m: float = 0.0
    duration_s: float = 0.0
    speed_mps: float = 0.0
    avg_speed_mps: float = 0.0
    max_speed_mps: float = 0.0
    speed_limit_mps: float = 0.0
    since_ms: int = 0
    odometer_m: float = 0.0


@dataclass(frozen=True, slots=True)
class TrackingEvent:
    """One event about one device."""

    event_id: str
    tenant: str
    device: str
    type: EventType
    time_ms: int
    lat: float
    lon: float
    fix_seq: int
    created_ms: int
    fence_id: str = ""
    route_id: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    activity: ActivityDetail | None = None


def event_id(
    tenant: str, device: str, kind: EventType, time_ms: int, subject: str
) -> str:
    """A stable id: the same event found twice (a replay, a retry) gets the same id."""
    key = f"{tenant}\x1f{device}\x1f{int(kind)}\x1f{time_ms}\x1f{subject}"
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


class FixProcessor(Protocol):
    """Turns newly stored fixes into events (geofencing, activity, routes)."""

    name: str

    async def process(self, stored: FixBatch) -> list[TrackingEvent]:
        """Called with new fixes of one tenant, ordered by device then fix time."""
        ...


EventListener = Callable[[Sequence[TrackingEvent]], Awaitable[None]]


class EventBus:
    """Fans events out to listeners; one failing listener does not stop the others."""

    def __init__(self) -> None:
        self._listeners: list[EventListener] = []

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: EventListener) -> None:
        self._listeners.remove(listener)

    def release(self) -> None:
        """The stop's deadline: listeners that make emitters wait for room (the
        event store) let them go, so that the processors finish."""
        for listener in self._listeners:
            release = getattr(listener, "release", None)
            if release is not None:
                release()

    async def forget_device(self, tenant: str, device: str) -> None:
        """Erasure: listeners that hold events before delivering them (the event
        store's queue) drop those of ``device`` of ``tenant``."""
        for listener in list(self._listeners):
            forget = getattr(listener, "forget_device", None)
            if forget is not None:
                await forget(tenant, device)

    async def emit(self, events: Sequence[TrackingEvent]) -> None:
        if not events:
            return
        metrics.events_emitted(events)
        for listener in list(self._listeners):
            try:
                await listener(events)
            except Exception:
                log.exception("event listener %r failed", listener)
