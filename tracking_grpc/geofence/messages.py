"""Fences between protobuf messages, GeoJSON features and FenceSpec, with checks.

Every check raises InvalidArgument naming the field, for example
``fence.shape.geojson.coordinates[0]`` or ``features[3].properties.radius_m``: a
GeoJSON Feature's settings are named where the Feature holds them (its
``properties`` or ``geometry``), never by the Fence message's field names.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from tracking.v1 import common_pb2, geofence_pb2

from tracking_grpc import convert
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.events import EventType
from tracking_grpc.geofence import schedule as schedules
from tracking_grpc.geofence.index import CompiledFence
from tracking_grpc.geofence.model import (
    GEOFENCE_EVENTS,
    FenceSpec,
    Schedule,
    ScheduleWindow,
    ShapeSpec,
)
from tracking_grpc.geofence.shapes import compile_checked, is_json_number

FENCE_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
MAX_LABELS = 32
MAX_METADATA = 64
MAX_METADATA_KEY = 64  # characters, as a label
MAX_METADATA_VALUE = 1024  # characters
MAX_NAME = 256  # characters
MAX_DWELL_MS = 30 * 86_400_000
MAX_IMPORT = 50_000


def check_fence_id(fence_id: str, field: str) -> str:
    if not FENCE_ID.match(fence_id):
        raise InvalidArgument(
            field, "1 to 128 letters, digits or -_.: characters are allowed"
        )
    return fence_id


def check_labels(labels: Sequence[str], field: str) -> None:
    """At most MAX_LABELS labels of 1 to 64 printable characters (a control
    character, NUL above all, cannot be stored as PostgreSQL text)."""
    if len(labels) > MAX_LABELS or any(
        not (0 < len(x) <= 64 and x.isprintable()) for x in labels
    ):
        raise InvalidArgument(
            field, f"at most {MAX_LABELS} labels of 1 to 64 printable characters"
        )


def check_metadata(metadata: dict[str, str], field: str) -> None:
    """At most MAX_METADATA entries, each key 1 to MAX_METADATA_KEY printable
    characters (as a label) and each value at most MAX_METADATA_VALUE printable
    characters: a fence travels whole in every answer and index that carries it."""
    if len(metadata) > MAX_METADATA:
        raise InvalidArgument(field, f"at most {MAX_METADATA} entries")
    for key in sorted(metadata):
        shown = repr(key[:MAX_METADATA_KEY]) + (
            "…" if len(key) > MAX_METADATA_KEY else ""
        )
        if not (0 < len(key) <= MAX_METADATA_KEY and key.isprintable()):
            raise InvalidArgument(
                field,
                f"key {shown} ({len(key)} characters): a key is 1 to "
                f"{MAX_METADATA_KEY} printable characters",
            )
        if len(metadata[key]) > MAX_METADATA_VALUE:
            raise InvalidArgument(
                field,
                f"the value of key {shown} has {len(metadata[key])} characters; "
                f"at most {MAX_METADATA_VALUE}",
            )
        bad = _unprintable(metadata[key])
        if bad:
            raise InvalidArgument(
                field,
                f"the value of key {shown} has {bad}; a value is at most "
                f"{MAX_METADATA_VALUE} printable characters",
            )


def check_name(name: str, field: str) -> None:
    """At most MAX_NAME printable characters (empty is no name)."""
    rule = f"a name is at most {MAX_NAME} printable characters"
    if len(name) > MAX_NAME:
        raise InvalidArgument(field, f"has {len(name)} characters; {rule}")
    bad = _unprintable(name)
    if bad:
        raise InvalidArgument(field, f"has {bad}; {rule}")


def refused_settings(spec: FenceSpec) -> str:
    """Why today's checks refuse a stored fence's name, labels or metadata, or "":
    a fence stored before a rule was tightened loads as it is, but its next
    UpdateFence must correct it."""
    try:
        check_name(spec.name, "name")
        check_labels(spec.labels, "labels")
        check_metadata(spec.metadata, "metadata")
    except InvalidArgument as exc:
        return exc.message
    return ""


def _unprintable(text: str) -> str:
    """Where ``text`` first holds a character that is not printable (a control
    character, NUL above all, cannot be stored as PostgreSQL text), or "".

    >>> _unprintable("Dock 4"), _unprintable("Dock\\n4")
    ('', 'U+000A, which is not printable, at character 4')
    """
    if text.isprintable():
        return ""
    k = next(k for k, c in enumerate(text) if not c.isprintable())
    return f"U+{ord(text[k]):04X}, which is not printable, at character {k}"


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


def _parsed_types(values: Iterable[int], field: str) -> frozenset[EventType]:
    """Event types from enum values (0, unspecified, is skipped)."""
    types = set()
    for i, value in enumerate(values):
        if value == 0:
            continue
        try:
            types.add(EventType(int(value)))
        except ValueError:
            reason = f"{value} is not an event type"
            raise InvalidArgument(f"{field}[{i}]", reason) from None
    return frozenset(types)


def event_types(values: Iterable[int], field: str) -> frozenset[EventType]:
    """The geofence event types a fence raises (0, unspecified, is skipped)."""
    types = _parsed_types(values, field)
    if types - GEOFENCE_EVENTS:
        raise InvalidArgument(field, "only ENTER, EXIT, DWELL and CROSS")
    return types


ROUTE_EVENTS = frozenset(
    {
        EventType.OFF_ROUTE,
        EventType.BACK_ON_ROUTE,
        EventType.ARRIVED,
        EventType.ETA_UPDATED,
    }
)


def listened_types(
    values: Iterable[int], field: str, routes_named: bool = False
) -> frozenset[EventType]:
    """The event types a WatchEvents or ListEvents call asks for: any the service
    raises. None given means the geofence types, what these calls gave before
    activity and route events reached them, so that an existing client is not
    flooded with MOTION_CHANGED and ONLINE events it never asked for; or, when
    the call names routes, the route types (a route filter with the geofence
    types would match nothing)."""
    default = ROUTE_EVENTS if routes_named else GEOFENCE_EVENTS
    return _parsed_types(values, field) or default


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
    check_name(spec.name, f"{field}.name")
    check_labels(spec.labels, f"{field}.labels")
    check_metadata(spec.metadata, f"{field}.metadata")
    if spec.schedule is not None:
        schedules.check(spec.schedule, f"{field}.schedule")
    compiled = compile_checked(spec.shape, f"{field}.shape", repair)
    spec = replace(spec, shape=compiled.spec)
    CompiledFence(spec, compiled.shape).check_measurable(f"{field}.shape")
    return spec, compiled.repairs


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
    props = _object(feature.get("properties"), f"{field}.properties")
    geometry = _object(feature.get("geometry"), f"{field}.geometry")
    spec = FenceSpec(
        fence_id=_feature_id(feature, props, field),
        shape=_feature_shape(geometry, props, field),
        name=_text(props, "name", field),
        dwell_ms=_whole_number(props, "dwell_ms", field),
        labels=_labels(props, field),
        metadata=_metadata(props, field),
        max_accuracy_m=_number(props, "max_accuracy_m", field, default=0.0),
    )
    try:
        spec, repairs = checked(spec, field, repair)
    except InvalidArgument as exc:
        raise InvalidArgument(_as_written(exc.field, field), exc.reason) from exc
    return spec, tuple(_repair_as_written(text, field) for text in repairs)


# A feature's settings are checked as a Fence message's are; these are the names
# a check gives them there (left) and where the Feature holds them (right). Longer
# names come first: the first one that is a whole prefix of the field is taken.
FEATURE_FIELDS = (
    (".shape.circle.radius_m", ".properties.radius_m"),
    (".shape.circle.center", ".geometry.coordinates"),
    (".shape.corridor.width_m", ".properties.width_m"),
    (".shape.corridor.path", ".geometry.coordinates"),
    (".shape.geojson", ".geometry"),
    (".shape", ".geometry"),
    (".name", ".properties.name"),
    (".dwell_ms", ".properties.dwell_ms"),
    (".max_accuracy_m", ".properties.max_accuracy_m"),
    (".labels", ".properties.labels"),
    (".metadata", ".properties.metadata"),
)


def _as_written(name: str, field: str) -> str:
    """A Fence message's field name as the GeoJSON Feature at ``field`` has it:
    ``features[3].dwell_ms`` is ``features[3].properties.dwell_ms``.

    >>> _as_written("features[3].shape.corridor.path[1]", "features[3]")
    'features[3].geometry.coordinates[1]'
    """
    rest = name.removeprefix(field)
    for ours, theirs in FEATURE_FIELDS:
        if rest == ours or rest.startswith((f"{ours}.", f"{ours}[")):
            return field + theirs + rest[len(ours) :]
    return name


def _repair_as_written(text: str, field: str) -> str:
    """A repair (``<field>: what was done``) naming the field as the Feature has it."""
    name, sep, what = text.partition(": ")
    return _as_written(name, field) + sep + what


def _feature_shape(geometry: dict, props: dict, field: str) -> ShapeSpec:
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Point" and "radius_m" in props:
        lon, lat = _pair(coords, f"{field}.geometry.coordinates")
        return ShapeSpec.circle(lat, lon, _number(props, "radius_m", field))
    if kind == "LineString" and "width_m" in props:
        if not isinstance(coords, list):
            raise InvalidArgument(f"{field}.geometry.coordinates", "expected a list")
        path = [
            _pair(p, f"{field}.geometry.coordinates[{j}]")[::-1]
            for j, p in enumerate(coords)
        ]
        return ShapeSpec.corridor(path, _number(props, "width_m", field))
    if kind in {"Polygon", "MultiPolygon"}:
        return ShapeSpec.geojson(json.dumps(geometry))
    raise InvalidArgument(
        f"{field}.geometry",
        "Polygon, MultiPolygon, Point with properties.radius_m or LineString "
        "with properties.width_m",
    )


def _object(value: Any, field: str) -> dict:
    """A JSON object member; absent or null reads as empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(field, "must be an object")
    return value


def _feature_id(feature: dict, props: dict, field: str) -> str:
    """The feature's id, else properties.id: a string or a whole number, checked as
    a fence id under the name it came by."""
    where, value = f"{field}.id", feature.get("id")
    if value is None:
        where, value = f"{field}.properties.id", props.get("id")
    if value is None:
        raise InvalidArgument(
            f"{field}.id", 'missing (set the Feature\'s "id" or properties.id)'
        )
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidArgument(where, "must be a string or a whole number")
    return check_fence_id(str(value), where)


def _pair(value: Any, field: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) < 2:
        raise InvalidArgument(field, "a position is [lon, lat]")
    if not (is_json_number(value[0]) and is_json_number(value[1])):
        raise InvalidArgument(field, "a position is [lon, lat] numbers")
    return float(value[0]), float(value[1])


def _number(props: dict, name: str, field: str, default: float | None = None) -> float:
    """A finite JSON number property (true and "5" are not numbers)."""
    value: Any = props.get(name, default)
    if not (is_json_number(value) and math.isfinite(value)):
        raise InvalidArgument(f"{field}.properties.{name}", "must be a finite number")
    return float(value)


def _whole_number(props: dict, name: str, field: str) -> int:
    """A whole JSON number property (5000 or 5000.0), 0 when absent."""
    value = props.get(name, 0)
    whole = is_json_number(value) and math.isfinite(value) and value == int(value)
    if not whole:
        raise InvalidArgument(f"{field}.properties.{name}", "must be a whole number")
    return int(value)


def _text(props: dict, name: str, field: str) -> str:
    value = props.get(name, "")
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}.properties.{name}", "must be a string")
    return value


def _labels(props: dict, field: str) -> tuple[str, ...]:
    labels = props.get("labels", [])
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise InvalidArgument(f"{field}.properties.labels", "must be a list of strings")
    return tuple(labels)


def _metadata(props: dict, field: str) -> dict[str, str]:
    metadata = _object(props.get("metadata"), f"{field}.properties.metadata")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidArgument(
            f"{field}.properties.metadata", "must map names to strings"
        )
    return dict(metadata)
