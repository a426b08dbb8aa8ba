"""Shared helpers for geofence tests: field-case fences and fixes as domain objects."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
from tracking.v1 import common_pb2, geofence_pb2

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import TrackingEvent
from tracking_grpc.geofence.detector import FenceDetector
from tracking_grpc.geofence.index import FenceIndex
from tracking_grpc.geofence.model import FenceSpec, ShapeSpec

TENANT = "t-geo"
NOW_MS = 1_900_000_000_000
# A 100 m circle in Berlin, as a FenceShape message.
DEPOT = geofence_pb2.FenceShape(
    circle=common_pb2.Circle(
        center=common_pb2.LatLng(lat=52.52, lon=13.405), radius_m=100
    )
)


def time_ms(ts: str) -> int:
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


def case_fence(fence: dict, **settings) -> FenceSpec:
    """A field case's fence as a FenceSpec (circle or GeoJSON polygon)."""
    if fence["type"] == "circle":
        centre = fence["center"]
        shape = ShapeSpec.circle(centre["lat"], centre["lon"], fence["radius_m"])
    else:
        shape = ShapeSpec.geojson(json.dumps(fence["geometry"]))
    return FenceSpec(fence["id"], shape, **settings)


def case_batch(fixes: list[dict]) -> FixBatch:
    """Fixes in arrival (seq) order."""
    fixes = sorted(fixes, key=lambda f: f["seq"])
    return FixBatch.from_columns(
        TENANT,
        [f["device"] for f in fixes],
        [f["seq"] for f in fixes],
        [time_ms(f["ts"]) for f in fixes],
        [f["lat"] for f in fixes],
        [f["lon"] for f in fixes],
        accuracy_m=[
            np.nan if f.get("accuracy_m") is None else f["accuracy_m"] for f in fixes
        ],
    )


def replay(
    specs: list[FenceSpec], batch: FixBatch, one_by_one: bool = True
) -> list[TrackingEvent]:
    """Events from feeding the fixes to a detector, one per batch or all at once."""
    index = FenceIndex.build(specs)
    detector = FenceDetector(TENANT)
    if not one_by_one:
        return detector.evaluate(batch, index, NOW_MS)
    events = []
    for i in range(len(batch)):
        events += detector.evaluate(batch.take(np.array([i])), index, NOW_MS)
    return events


def summary(events: list[TrackingEvent]) -> list[tuple[str, int]]:
    return [(e.type.name, e.fix_seq) for e in events]
