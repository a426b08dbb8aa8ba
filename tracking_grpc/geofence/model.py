"""Fences as the service stores them: the shape as given and the per-fence settings.

>>> fence = FenceSpec("depot", shape=ShapeSpec.circle(52.52, 13.405, 100.0))
>>> FenceSpec.from_json(fence.to_json()) == fence
True
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tracking_grpc.events import EventType

GEOFENCE_EVENTS = frozenset(
    {EventType.ENTER, EventType.EXIT, EventType.DWELL, EventType.CROSS}
)


@dataclass(frozen=True, slots=True)
class ShapeSpec:
    """The area of a fence as the caller gave it (after any repair)."""

    kind: str  # circle, geojson, wkt or corridor
    text: str = ""  # GeoJSON or WKT
    lat: float = math.nan  # circle centre
    lon: float = math.nan
    radius_m: float = math.nan
    path: tuple[tuple[float, float], ...] = ()  # corridor line, (lat, lon) pairs
    width_m: float = math.nan

    @classmethod
    def circle(cls, lat: float, lon: float, radius_m: float) -> ShapeSpec:
        return cls("circle", lat=lat, lon=lon, radius_m=radius_m)

    @classmethod
    def geojson(cls, text: str) -> ShapeSpec:
        return cls("geojson", text=text)

    @classmethod
    def wkt(cls, text: str) -> ShapeSpec:
        return cls("wkt", text=text)

    @classmethod
    def corridor(
        cls, path: list[tuple[float, float]] | tuple, width_m: float
    ) -> ShapeSpec:
        return cls(
            "corridor",
            path=tuple((float(a), float(b)) for a, b in path),
            width_m=width_m,
        )

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if _is_set(v)}
        if "path" in data:
            data["path"] = [list(p) for p in self.path]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeSpec:
        values = dict(data)
        if "path" in values:
            values["path"] = tuple(tuple(p) for p in values["path"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class ScheduleWindow:
    """Local minutes [start, end) on the given ISO weekdays (1 = Monday)."""

    days: frozenset[int]
    start_minute: int
    end_minute: int


@dataclass(frozen=True, slots=True)
class Schedule:
    timezone: str
    windows: tuple[ScheduleWindow, ...]


@dataclass(frozen=True, slots=True)
class FenceSpec:
    """A fence and its settings, one tenant's, as stored."""

    fence_id: str
    shape: ShapeSpec
    name: str = ""
    dwell_ms: int = 0
    events: frozenset[EventType] = frozenset()
    schedule: Schedule | None = None
    labels: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    max_accuracy_m: float = 0.0
    version: int = 0
    created_ms: int = 0
    updated_ms: int = 0

    def emits(self) -> frozenset[EventType]:
        """Event types this fence raises (the default when none are named)."""
        if self.events:
            return self.events
        default = {EventType.ENTER, EventType.EXIT}
        if self.dwell_ms > 0:
            default.add(EventType.DWELL)
        return frozenset(default)

    def with_version(self, version: int, now_ms: int, created_ms: int) -> FenceSpec:
        return replace(self, version=version, updated_ms=now_ms, created_ms=created_ms)

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "fence_id": self.fence_id,
            "shape": self.shape.to_dict(),
            "name": self.name,
            "dwell_ms": self.dwell_ms,
            "events": sorted(int(e) for e in self.events),
            "labels": list(self.labels),
            "metadata": self.metadata,
            "max_accuracy_m": self.max_accuracy_m,
            "version": self.version,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
        }
        if self.schedule is not None:
            data["schedule"] = {
                "timezone": self.schedule.timezone,
                "windows": [
                    [sorted(w.days), w.start_minute, w.end_minute]
                    for w in self.schedule.windows
                ],
            }
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FenceSpec:
        data = json.loads(text)
        schedule = None
        if "schedule" in data:
            schedule = Schedule(
                data["schedule"]["timezone"],
                tuple(
                    ScheduleWindow(frozenset(days), start, end)
                    for days, start, end in data["schedule"]["windows"]
                ),
            )
        return cls(
            fence_id=data["fence_id"],
            shape=ShapeSpec.from_dict(data["shape"]),
            name=data["name"],
            dwell_ms=data["dwell_ms"],
            events=frozenset(EventType(e) for e in data["events"]),
            schedule=schedule,
            labels=tuple(data["labels"]),
            metadata=dict(data["metadata"]),
            max_accuracy_m=data["max_accuracy_m"],
            version=data["version"],
            created_ms=data["created_ms"],
            updated_ms=data["updated_ms"],
        )


def _is_set(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isnan(value)
    return value not in ("", ())
