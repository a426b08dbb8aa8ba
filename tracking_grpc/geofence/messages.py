"""Fences between protobuf messages, GeoJSON features and FenceSpec, with checks.

Every check raises InvalidArgument naming the field, for example
``fence.shape.geojson.coordinates[0]`` or ``features[3].properties.radius_m``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from tracking.v1 import common_pb2, geofence_pb2

from tracking_grpc import convert
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.events import EventType
from tracking_grpc.geofence import schedule as schedules
from tracking_grpc.geofence.model import (
    GEOFENCE_EVENTS,
    FenceSpec,
    Schedule,
    ScheduleWindow,
    ShapeSpec,
)
from tracking_grpc.geofence.shapes import compile_checked

FENCE_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
MAX_LABELS = 32
MAX_METADATA = 64
MAX_DWELL_MS = 30 * 86_400_000
MAX_IMPORT = 50_000


def check_fence_id(fence_id: str, field: str) -> str:
    if not FENCE_ID.match(fence_id):
        raise InvalidArgument(
            field, "1 to 128 letters, digits or -_.: characters are allowed"
        )
    return fence_id


def shape_of(message: geofence_pb2.FenceShape, field: str) -> ShapeSpec:
    kind = message.WhichOneof("shape")
    if kind == "circle":
        c = message.circle
        convert.require(c, "center", f"{field}.circle.center")
        return ShapeSpec.circle(c.center.lat, c.center.lon, c.radius_m)
    if kind == "geojson":
        return ShapeSpec.geojson(message.geojson)
    if kind == "wkt":
        return ShapeSpec.wkt(message.wkt)
    if kind == "corridor":
        path = [(p.lat, p.lon) for p in message.corridor.path]
        return ShapeSpec.corridor(path, message.corridor.width_m)
    raise InvalidArgument(field, "set one of circle, geojson, wkt or corridor")


def shape_message(shape: ShapeSpec) -> geofence_pb2.FenceShape:
    if shape.kind == "circle":
        centre = common_pb2.LatLng(lat=shape.lat, lon=shape.lon)
        circle = common_pb2.Circle(center=centre, radius_m=shape.radius_m)
        return geofence_pb2.FenceShape(circle=circle)
    if shape.kind == "corridor":
        path = [common_pb2.LatLng(lat=a, lon=b) for a, b in shape.path]
        corridor = geofence_pb2.Corridor(path=path, width_m=shape.width_m)
        return geofence_pb2.FenceShape(corridor=corridor)
    if shape.kind == "wkt":
        return geofence_pb2.FenceShape(wkt=shape.text)
    return geofence_pb2.FenceShape(geojson=shape.text)


def event_types(values: Iterable[int], field: str) -> frozenset[EventType]:
    """The geofence event types asked for (0, unspecified, is skipped)."""
    types = set()
    for i, value in enumerate(values):
        if value == 0:
            continue
        try:
            types.add(EventType(int(value)))
        except ValueError:
            reason = f"{value} is not an event type"
            raise InvalidArgument(f"{field}[{i}]", reason) from None
    if types - GEOFENCE_EVENTS:
        raise InvalidArgument(field, "only ENTER, EXIT, DWELL and CROSS")
    return frozenset(types)


def fence_of(
    message: geofence_pb2.Fence, field: str, repair: bool, fence_id: str
) -> tuple[FenceSpec, tuple[str, ...]]:
    """A checked FenceSpec from a Fence message, with the repairs made to its shape."""
    events = event_types(message.events, f"{field}.events")
    window_list = []
    if message.HasField("schedule"):
        for w in message.schedule.windows:
            days = frozenset(int(d) for d in w.days if int(d) != 0)
            window_list.append(ScheduleWindow(days, w.start_minute, w.end_minute))
    spec = FenceSpec(
        fence_id=fence_id,
        shape=shape_of(message.shape, f"{field}.shape"),
        name=message.name,
        dwell_ms=message.dwell_ms,
        events=events,
        schedule=(
            Schedule(message.schedule.timezone, tuple(window_list))
            if message.HasField("schedule")
            else None
        ),
        labels=tuple(message.labels),
        metadata=dict(message.metadata),
        max_accuracy_m=message.max_accuracy_m,
    )
    return checked(spec, field, repair)


def checked(
    spec: FenceSpec, field: str, repair: bool
) -> tuple[FenceSpec, tuple[str, ...]]:
    """The spec with its settings checked and its shape validated (and repaired)."""
    check_fence_id(spec.fence_id, f"{field}.fence_id")
    if not 0 <= spec.dwell_ms <= MAX_DWELL_MS:
        raise InvalidArgument(f"{field}.dwell_ms", "must lie within 0 and 30 days")
    if not (math.isfinite(spec.max_accuracy_m) and spec.max_accuracy_m >= 0):
        raise InvalidArgument(f"{field}.max_accuracy_m", "must be 0 or more metres")
    if len(spec.labels) > MAX_LABELS or any(not 0 < len(x) <= 64 for x in spec.labels):
        raise InvalidArgument(
            f"{field}.labels", f"at most {MAX_LABELS} labels of 1 to 64 characters"
        )
    if len(spec.metadata) > MAX_METADATA:
        raise InvalidArgument(f"{field}.metadata", f"at most {MAX_METADATA} entries")
    if spec.schedule is not None:
        schedules.check(spec.schedule, f"{field}.schedule")
    compiled = compile_checked(spec.shape, f"{field}.shape", repair)
    return replace(spec, shape=compiled.spec), compiled.repairs


def fence_message(spec: FenceSpec) -> geofence_pb2.Fence:
    message = geofence_pb2.Fence(
        fence_id=spec.fence_id,
        name=spec.name,
        shape=shape_message(spec.shape),
        dwell_ms=spec.dwell_ms,
        events=sorted(int(e) for e in spec.events),
        labels=list(spec.labels),
        metadata=spec.metadata,
        max_accuracy_m=spec.max_accuracy_m,
        version=spec.version,
        created_ms=spec.created_ms,
        updated_ms=spec.updated_ms,
    )
    if spec.schedule is not None:
        message.schedule.timezone = spec.schedule.timezone
        for w in spec.schedule.windows:
            message.schedule.windows.add(
                days=sorted(w.days),
                start_minute=w.start_minute,
                end_minute=w.end_minute,
            )
    return message


def fences_of_feature_collection(
    text: str, repair: bool
) -> tuple[list[FenceSpec], list[str]]:
    """Fences from a GeoJSON FeatureCollection (see ImportFencesRequest)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument("geojson", f"not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        raise InvalidArgument("geojson", "expected a GeoJSON FeatureCollection")
    features = data.get("features")
    if not isinstance(features, list) or not features:
        raise InvalidArgument("geojson.features", "expected a non-empty list")
    if len(features) > MAX_IMPORT:
        raise InvalidArgument("geojson.features", f"at most {MAX_IMPORT} per import")
    specs: list[FenceSpec] = []
    repairs: list[str] = []
    seen: set[str] = set()
    for i, feature in enumerate(features):
        spec, fixed = _feature(feature, f"features[{i}]", repair)
        if spec.fence_id in seen:
            raise InvalidArgument(f"features[{i}].id", f"{spec.fence_id!r} repeats")
        seen.add(spec.fence_id)
        specs.append(spec)
        repairs.extend(fixed)
    return specs, repairs


def _feature(
    feature: Any, field: str, repair: bool
) -> tuple[FenceSpec, tuple[str, ...]]:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise InvalidArgument(field, "expected a GeoJSON Feature")
    props = feature.get("properties") or {}
    geometry = feature.get("geometry") or {}
    fence_id = str(feature.get("id", props.get("id", "")))
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Point" and "radius_m" in props:
        lon, lat = _pair(coords, f"{field}.geometry.coordinates")
        shape = ShapeSpec.circle(lat, lon, _number(props, "radius_m", field))
    elif kind == "LineString" and "width_m" in props:
        if not isinstance(coords, list):
            raise InvalidArgument(f"{field}.geometry.coordinates", "expected a list")
        path = [
            _pair(p, f"{field}.geometry.coordinates[{j}]")[::-1]
            for j, p in enumerate(coords)
        ]
        shape = ShapeSpec.corridor(path, _number(props, "width_m", field))
    elif kind in {"Polygon", "MultiPolygon"}:
        shape = ShapeSpec.geojson(json.dumps(geometry))
    else:
        raise InvalidArgument(
            f"{field}.geometry",
            "Polygon, MultiPolygon, Point with properties.radius_m or LineString "
            "with properties.width_m",
        )
    labels = props.get("labels", [])
    metadata = props.get("metadata", {})
    if not isinstance(labels, list) or not isinstance(metadata, dict):
        raise InvalidArgument(
            f"{field}.properties", "labels is a list, metadata an object"
        )
    spec = FenceSpec(
        fence_id=fence_id,
        shape=shape,
        name=str(props.get("name", "")),
        dwell_ms=int(props.get("dwell_ms", 0)),
        labels=tuple(str(x) for x in labels),
        metadata={str(k): str(v) for k, v in metadata.items()},
        max_accuracy_m=float(props.get("max_accuracy_m", 0.0)),
    )
    spec, repairs = checked(spec, field, repair)
    return spec, repairs


def _pair(value: Any, field: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) < 2:
        raise InvalidArgument(field, "a position is [lon, lat]")
    try:
        return float(value[0]), float(value[1])
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(field, "a position is [lon, lat] numbers") from exc


def _number(props: dict, name: str, field: str) -> float:
    try:
        return float(props[name])
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{field}.properties.{name}", "must be a number") from exc
