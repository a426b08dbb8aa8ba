"""Repository interfaces for geofences and their events; backends implement these.

Every method takes the tenant; no backend mixes tenants. Fences carry a version that
every write increments; ``revision`` changes whenever any fence of the tenant does,
so that evaluators know when to reload.
"""

from __future__ import annotations

import base64
import builtins
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

from tracking_grpc.errors import InvalidArgument
from tracking_grpc.events import ActivityDetail, EventType, TrackingEvent
from tracking_grpc.geofence.model import FenceSpec


@dataclass(frozen=True, slots=True)
class ImportResult:
    fences: list[FenceSpec]
    created: int
    replaced: int


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Stored events of a tenant with start_ms <= time_ms < end_ms, oldest first."""

    tenant: str
    start_ms: int
    end_ms: int
    device: str = ""
    fence_id: str = ""
    route_id: str = ""
    types: frozenset[EventType] = frozenset()
    limit: int = 100
    after: tuple[int, str] | None = None  # (time_ms, event_id) of the previous page


@dataclass(frozen=True, slots=True)
class Membership:
    """A device inside a fence, as its latest stored events say; the position and
    fix sequence number are those of the ENTER (a DWELL raised by the timer after a
    restart, before the device's next fix, carries them)."""

    device: str
    fence_id: str
    entered_ms: int
    dwell_done: bool
    last_event_ms: int  # newest event of the device for this fence
    lat: float = math.nan
    lon: float = math.nan
    fix_seq: int = 0


MEMBERSHIP_SQL = """
SELECT m.device, m.fence_id, m.entered, m.exited, m.dwelled, m.newest,
    e.lat, e.lon, e.fix_seq
FROM (
    SELECT tenant, device, fence_id,
        max(CASE WHEN type = 1 THEN time_ms END) AS entered,
        max(CASE WHEN type = 2 THEN time_ms END) AS exited,
        max(CASE WHEN type = 3 THEN time_ms END) AS dwelled,
        max(time_ms) AS newest
    FROM geofence_events WHERE tenant = {mark} AND type IN (1, 2, 3){devices}
    GROUP BY tenant, device, fence_id
) AS m
LEFT JOIN geofence_events AS e ON e.tenant = m.tenant AND e.device = m.device
    AND e.fence_id = m.fence_id AND e.type = 1 AND e.time_ms = m.entered
"""


class Memberships(list[Membership]):
    """Memberships read from the stored events, and the newest ENTER, EXIT or
    DWELL time of every device the rows named (over all its fences, the ones it
    left included): a fix not newer than that is late for the reader."""

    def __init__(self, found: Sequence[Membership], newest_ms: dict[str, int]):
        super().__init__(found)
        self.newest_ms = newest_ms


def memberships_of(rows: Sequence[tuple]) -> Memberships:
    """Memberships from (device, fence, enter, exit, dwell, newest) time rows and
    the ENTER's (lat, lon, fix_seq)."""
    found = []
    newest_ms: dict[str, int] = {}
    for device, fence_id, entered, exited, dwelled, newest, *enter in rows:
        newest_ms[device] = max(newest_ms.get(device, int(newest)), int(newest))
        if entered is None or (exited is not None and exited >= entered):
            continue
        done = dwelled is not None and dwelled >= entered
        lat, lon, seq = (math.nan, math.nan, 0) if enter[0] is None else enter
        found.append(
            Membership(
                device,
                fence_id,
                int(entered),
                done,
                int(newest),
                float(lat),
                float(lon),
                int(seq),
            )
        )
    return Memberships(found, newest_ms)


class FenceRepository(Protocol):
    """Durable fences of every tenant."""

    async def create(self, tenant: str, fence: FenceSpec, now_ms: int) -> FenceSpec:
        """Store a new fence at version 1; AlreadyExists if the id is taken."""
        ...

    async def update(
        self, tenant: str, fence: FenceSpec, now_ms: int, expected_version: int = 0
    ) -> FenceSpec:
        """Replace a fence, version + 1; NotFound, or FailedPrecondition on a version
        other than ``expected_version`` (0 skips the check)."""
        ...

    async def import_many(
        self,
        tenant: str,
        fences: Sequence[FenceSpec],
        now_ms: int,
        replace_existing: bool,
    ) -> ImportResult:
        """Create (or replace) many fences in one transaction: all or none."""
        ...

    async def delete(self, tenant: str, fence_id: str) -> None:
        """NotFound when there is no such fence."""
        ...

    async def get(self, tenant: str, fence_id: str) -> FenceSpec:
        """NotFound when there is no such fence."""
        ...

    async def list(
        self, tenant: str, labels: Sequence[str], limit: int, after: str = ""
    ) -> list[FenceSpec]:
        """Fences with every one of ``labels``, by id, with ids after ``after``."""
        ...

    async def all(self, tenant: str) -> builtins.list[FenceSpec]: ...

    async def revision(self, tenant: str) -> int:
        """A number that changes whenever a fence of the tenant is written."""
        ...

    async def tenants(self) -> builtins.list[str]:
        """Every tenant that has written fences (the dwell timer's restart)."""
        ...

    async def close(self) -> None: ...


class EventRepository(Protocol):
    """Durable events of every type (geofence, activity, route), de-duplicated by
    event id."""

    async def add(self, events: Sequence[TrackingEvent]) -> int:
        """Store events (any tenants); returns how many were new."""
        ...

    async def list(self, query: EventQuery) -> list[TrackingEvent]: ...

    async def memberships(
        self, tenant: str, devices: Sequence[str] | None = None
    ) -> Memberships:
        """Devices inside fences by their latest ENTER, EXIT and DWELL events; of
        ``devices`` only, when given (one query however many); with each named
        device's newest such event time (``Memberships.newest_ms``)."""
        ...

    async def unpublished(self, limit: int) -> builtins.list[TrackingEvent]:
        """Stored events (any tenant) not yet marked published, oldest first."""
        ...

    async def mark_published(self, events: Sequence[TrackingEvent]) -> None: ...

    async def erase_device(self, tenant: str, device: str) -> int:
        """Delete the device's events; returns how many."""
        ...

    async def purge_before(self, cutoff_ms: int) -> int:
        """Delete the events of every tenant with time_ms < cutoff_ms; how many."""
        ...

    async def close(self) -> None: ...


def stamped(fence: FenceSpec, version: int, now_ms: int, created_ms: int) -> FenceSpec:
    return replace(fence, version=version, updated_ms=now_ms, created_ms=created_ms)


# The stored columns of an event, in the order of ``event_row`` and ``event_of_row``.
EVENT_FIELDS = (
    "tenant", "event_id", "device", "fence_id", "type", "time_ms", "lat", "lon",
    "fix_seq", "created_ms", "attributes", "route_id", "activity",
)  # fmt: skip


def event_attributes(event: TrackingEvent) -> str:
    return json.dumps(event.attributes, sort_keys=True)


ACTIVITY_FIELDS = tuple(f.name for f in fields(ActivityDetail))


def activity_text(detail: ActivityDetail | None) -> str | None:
    """An activity detail as JSON; None for an event without one."""
    if detail is None:
        return None
    # Not dataclasses.asdict, which copies every value: 6.4 µs against 4.3.
    return json.dumps({name: getattr(detail, name) for name in ACTIVITY_FIELDS})


def activity_of_text(text: str | None) -> ActivityDetail | None:
    return ActivityDetail(**json.loads(text)) if text else None


def event_row(e: TrackingEvent) -> tuple[Any, ...]:
    """The values of EVENT_FIELDS for an event."""
    return (
        e.tenant,
        e.event_id,
        e.device,
        e.fence_id,
        int(e.type),
        e.time_ms,
        e.lat,
        e.lon,
        e.fix_seq,
        e.created_ms,
        event_attributes(e),
        e.route_id,
        activity_text(e.activity),
    )


def event_of_row(row: Sequence[Any]) -> TrackingEvent:
    """The event of EVENT_FIELDS values (attributes and activity as JSON text)."""
    tenant, event_id, device, fence_id, kind, time_ms, lat, lon, seq, created = row[:10]
    attributes, route_id, activity = row[10:]
    return TrackingEvent(
        event_id=event_id,
        tenant=tenant,
        device=device,
        type=EventType(kind),
        time_ms=int(time_ms),
        lat=float(lat),
        lon=float(lon),
        fix_seq=int(seq),
        created_ms=int(created),
        fence_id=fence_id,
        route_id=route_id,
        attributes=json.loads(attributes),
        activity=activity_of_text(activity),
    )


MAX_TOKEN_CHARS = 1024  # issued tokens are well under 200
NOT_ISSUED = "not a token this service issued"


def encode_token(value: object) -> str:
    """An opaque page token."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def decode_token(token: str, field: str = "page_token") -> object:
    """The JSON value of a page token; the caller checks its shape and types.

    A token is the caller's input: it is bounded in size and nesting, and the
    non-standard constants NaN and Infinity are refused like any other garbage.
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument(field, NOT_ISSUED)
    try:
        text = base64.urlsafe_b64decode(token.encode())
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidArgument(field, NOT_ISSUED) from exc


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")
