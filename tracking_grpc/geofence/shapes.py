"""Fence shapes: parse, validate, optionally repair, and normalise to lon/lat areas.

Polygon edges are straight lines in longitude and latitude (as in GeoJSON and
PostGIS geometry). Whether a ring crosses the antimeridian is decided edge by edge:
an edge whose longitudes differ by more than 180 degrees takes the short way, across
±180. A ring whose edges then wind once around the globe encloses the pole on its side
(the pole its latitudes lie towards). The result is split at ±180 so that every area
lies within -180..180 and a plain planar test answers containment.

>>> wkt = "POLYGON((170 -1, -170 -1, -170 1, 170 1, 170 -1))"
>>> shape = compile_shape(ShapeSpec.wkt(wkt))
>>> [round(b) for b in shape.area.bounds]
[-180, -1, 180, 1]
>>> shape.area.geom_type
'MultiPolygon'
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyproj
import shapely
from shapely.geometry import MultiPolygon, Polygon, box, mapping

from tracking_grpc.errors import InvalidArgument
from tracking_grpc.geofence.model import ShapeSpec

log = logging.getLogger(__name__)

GEOD = pyproj.Geod(ellps="WGS84")
MAX_RADIUS_M = 5_000_000.0
# A fence travels whole in every answer that carries it; at these sizes one fits a
# client's default 4 MB message limit with room to spare (tens of thousands of
# vertices: far more than any geofence needs).
MAX_SHAPE_BYTES = 1_000_000
MAX_CORRIDOR_POINTS = 20_000
_WHERE = re.compile(r"^(?P<reason>[^\[]+)\[(?P<x>[-\d.e+]+) (?P<y>[-\d.e+]+)\]$")


@dataclass(frozen=True, slots=True)
class Shape:
    """A validated fence area.

    ``area`` covers the fence (for circles a polygon slightly larger than the true
    circle), ``core`` lies wholly inside it (for circles slightly smaller); both are
    lon/lat geometries within -180..180. ``origin`` is where the fence's metric
    projection is centred.
    """

    kind: str
    area: shapely.Geometry
    core: shapely.Geometry
    origin_lon: float
    origin_lat: float
    radius_m: float = math.nan  # circles only


@dataclass(frozen=True, slots=True)
class Compiled:
    shape: Shape
    spec: ShapeSpec  # as given, or as repaired
    repairs: tuple[str, ...]


def compile_shape(
    spec: ShapeSpec, field: str = "fence.shape", repair: bool = False
) -> Shape:
    """Validate a shape and build its area; raises InvalidArgument naming the fault."""
    return compile_checked(spec, field, repair).shape


def compile_checked(spec: ShapeSpec, field: str, repair: bool) -> Compiled:
    if spec.kind == "circle":
        return Compiled(_circle(spec, f"{field}.circle"), spec, ())
    if spec.kind == "corridor":
        return Compiled(_corridor(spec, f"{field}.corridor"), spec, ())
    if spec.kind in ("geojson", "wkt") and len(spec.text) > MAX_SHAPE_BYTES:
        where = f"{field}.{spec.kind}"
        raise InvalidArgument(where, f"at most {MAX_SHAPE_BYTES} characters")
    if spec.kind == "geojson":
        polygons = _geojson_polygons(spec.text, f"{field}.geojson")
        where = f"{field}.geojson"
    elif spec.kind == "wkt":
        polygons = _wkt_polygons(spec.text, f"{field}.wkt")
        where = f"{field}.wkt"
    else:
        raise InvalidArgument(field, "set one of circle, geojson, wkt or corridor")
    area, unwrapped, repairs = _polygon_area(polygons, where, repair)
    if repairs:
        spec = ShapeSpec.geojson(json.dumps(mapping(unwrapped)))
        log.info("fence shape repaired: %s", "; ".join(repairs))
    lon, lat = _origin(unwrapped)
    return Compiled(Shape("polygon", area, area, lon, lat), spec, tuple(repairs))


# Polygons -----------------------------------------------------------------------------

Ring = list[tuple[float, float]]


def _geojson_polygons(text: str, field: str) -> list[tuple[str, list[Any]]]:
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(field, f"not JSON: {exc}") from exc
    except RecursionError:
        raise InvalidArgument(field, "not a GeoJSON shape: nested too deeply") from None
    if isinstance(data, dict) and data.get("type") == "Feature":
        data = data.get("geometry")
    if not isinstance(data, dict) or "coordinates" not in data:
        raise InvalidArgument(field, "expected a GeoJSON Polygon or MultiPolygon")
    kind, coords = data.get("type"), data["coordinates"]
    if kind == "Polygon":
        return [(f"{field}.coordinates", coords)]
    if kind == "MultiPolygon" and isinstance(coords, list):
        return [(f"{field}.coordinates[{i}]", p) for i, p in enumerate(coords)]
    raise InvalidArgument(field, f"type {kind!r} is not Polygon or MultiPolygon")


def _wkt_polygons(text: str, field: str) -> list[tuple[str, list[Any]]]:
    try:
        with np.errstate(invalid="ignore"):  # a NaN coordinate is refused below
            geom = shapely.from_wkt(text)
    except shapely.errors.GEOSException as exc:
        raise InvalidArgument(field, f"not valid WKT: {exc}") from exc
    if geom is None or geom.geom_type not in {"Polygon", "MultiPolygon"}:
        raise InvalidArgument(field, "expected a POLYGON or MULTIPOLYGON")
    parts = [geom] if geom.geom_type == "Polygon" else list(geom.geoms)
    return [
        (
            f"{field}.polygon[{i}]" if len(parts) > 1 else field,
            [list(p.exterior.coords), *[list(r.coords) for r in p.interiors]],
        )
        for i, p in enumerate(parts)
    ]


def _polygon_area(
    polygons: list[tuple[str, list[Any]]], field: str, repair: bool
) -> tuple[shapely.Geometry, shapely.Geometry, list[str]]:
    repairs: list[str] = []
    parts: list[Polygon] = []
    for where, rings in polygons:
        polygon = _polygon(rings, where, repair, repairs)
        if polygon is None:
            continue
        reason = shapely.is_valid_reason(polygon)
        if reason == "Valid Geometry":
            parts.append(polygon)
            continue
        if not repair:
            raise InvalidArgument(where, _explain(reason))
        parts.extend(_polygons_of(_make_valid(polygon, where)))
        repairs.append(f"{where}: {_explain(reason)}; split into valid parts")
    if not parts:
        raise InvalidArgument(field, "no polygon with an area is left")
    unwrapped = parts[0] if len(parts) == 1 else MultiPolygon(parts)
    reason = shapely.is_valid_reason(unwrapped)
    if reason != "Valid Geometry":
        where = _explain(reason).split(" at ", 1)[-1]
        if not repair:
            raise InvalidArgument(
                field, f"polygons overlap or touch along an edge at {where}"
            )
        unwrapped = _make_valid(shapely.union_all(parts), field)
        repairs.append(f"{field}: polygons overlapped at {where}; merged them")
    return _split_at_antimeridian(unwrapped), unwrapped, repairs


def _polygon(
    rings: Any, field: str, repair: bool, repairs: list[str]
) -> Polygon | None:
    if not isinstance(rings, list) or not rings:
        raise InvalidArgument(field, "a polygon needs at least its outer ring")
    clean: list[tuple[int, np.ndarray]] = []  # each kept ring with its place
    for i, ring in enumerate(rings):
        where = f"{field}[{i}]"
        coords = _ring(ring, where, repair, repairs)
        if coords is None:
            if i == 0:
                raise InvalidArgument(where, "outer ring has no area")
            continue
        clean.append((i, coords))
    if not clean:
        return None
    for i, coords in clean:
        _refuse_collapsed_edges(coords, f"{field}[{i}]")
    outer = clean[0][1]
    lons, winds = _unwrap(outer[:, 0], outer[:, 1])
    if not winds:
        _refuse_round_the_globe(lons, outer[:, 1], f"{field}[0]")
    shell = np.column_stack([lons, outer[:, 1]])
    if winds:
        shell = _close_over_pole(shell)
    west = float(shell[:, 0].min())
    holes = []
    for i, hole in clean[1:]:
        hole_lons, hole_winds = _unwrap(hole[:, 0], hole[:, 1])
        if hole_winds:
            raise InvalidArgument(f"{field}[{i}]", "a hole may not wind around a pole")
        hole_lons = hole_lons - 360.0 * np.floor((hole_lons[0] - west) / 360.0)
        holes.append(np.column_stack([hole_lons, hole[:, 1]]))
    return Polygon(shell, holes)


def _ring(ring: Any, field: str, repair: bool, repairs: list[str]) -> np.ndarray | None:
    """A ring as an (n, 2) lon/lat array, checked; None if repair drops it."""
    if not isinstance(ring, list | tuple):
        raise InvalidArgument(field, "a ring is a list of [lon, lat] positions")
    coords = np.empty((len(ring), 2))
    for j, position in enumerate(ring):
        coords[j] = _position(position, f"{field}[{j}]")
    if len(coords) and not np.array_equal(coords[0], coords[-1]):
        if not repair:
            raise InvalidArgument(
                field,
                f"ring is not closed: first position {_pair(coords[0])} differs from "
                f"last {_pair(coords[-1])} (RFC 7946 3.1.6: they must be identical)",
            )
        coords = np.vstack([coords, coords[:1]])
        repairs.append(f"{field}: closed the ring")
    keep = np.ones(len(coords), dtype=bool)
    keep[1:] = np.any(coords[1:] != coords[:-1], axis=1)
    coords = coords[keep]
    if len(coords) < 4 or len(np.unique(coords, axis=0)) < 3:
        reason = (
            f"ring has {len(ring)} positions ({len(coords)} after dropping repeats); "
            "a linear ring needs at least 4 positions around an area"
        )
        if not repair or field.endswith("[0]"):
            raise InvalidArgument(field, reason)
        repairs.append(f"{field}: dropped the hole: {reason}")
        return None
    return coords


def is_json_number(value: Any) -> bool:
    """A JSON number as parsed: an int or a float, never a bool or a string."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _position(position: Any, field: str) -> tuple[float, float]:
    if not isinstance(position, list | tuple) or len(position) < 2:
        raise InvalidArgument(field, "a position is [lon, lat]")
    if not (is_json_number(position[0]) and is_json_number(position[1])):
        raise InvalidArgument(field, "a position is [lon, lat] numbers")
    lon, lat = float(position[0]), float(position[1])
    check_lat_lon(lat, lon, field)
    return lon, lat


def check_lat_lon(lat: float, lon: float, field: str) -> None:
    """InvalidArgument unless lat/lon are finite and in range."""
    if not (math.isfinite(lat) and math.isfinite(lon)):
        raise InvalidArgument(field, "coordinates must be finite numbers")
    if not -90.0 <= lat <= 90.0:
        raise InvalidArgument(field, f"latitude {lat:g} is outside -90..90")
    if not -180.0 <= lon <= 180.0:
        raise InvalidArgument(field, f"longitude {lon:g} is outside -180..180")


def _unwrap(lons: np.ndarray, lats: np.ndarray) -> tuple[np.ndarray, int]:
    """Longitudes made continuous along the edges, and the turns around a pole."""
    step = np.diff(lons)
    at_pole = (np.abs(lats[:-1]) == 90.0) & (lats[:-1] == lats[1:])
    crosses = (np.abs(step) > 180.0) & ~at_pole
    if not crosses.any():
        return lons, 0
    step = np.where(crosses, step - 360.0 * np.sign(step), step)
    unwrapped = lons[0] + np.concatenate([[0.0], np.cumsum(step)])
    return unwrapped, round((unwrapped[-1] - unwrapped[0]) / 360.0)


def _refuse_collapsed_edges(coords: np.ndarray, field: str) -> None:
    """InvalidArgument if an edge runs from -180 to 180 (or back) off the poles.

    Taken the short way such an edge has no length: it collapses to a point on
    the antimeridian, and the ring with it (at a pole, ±180 is one point anyway).
    """
    lons, lats = coords[:, 0], coords[:, 1]
    at_pole = (np.abs(lats[:-1]) == 90.0) & (lats[:-1] == lats[1:])
    whole = np.flatnonzero((np.abs(np.diff(lons)) == 360.0) & ~at_pole)
    if whole.size:
        j = int(whole[0])
        raise InvalidArgument(
            field,
            f"the edge from {_pair(coords[j])} to {_pair(coords[j + 1])} spans all "
            "360° of longitude; an edge takes the short way, so it collapses to a "
            "point on the antimeridian: a ring cannot go round the globe in one edge",
        )


def _refuse_round_the_globe(lons: np.ndarray, lats: np.ndarray, field: str) -> None:
    """InvalidArgument if an unwinding ring spans all 360° of longitude other than
    as a cap on one pole.

    Its edges at -180 and 180 then lie on one meridian and cancel out: from pole
    to pole the ring collapses to the whole world, and off the poles to a band
    round the globe that no single outline bounds. Only a cap that reaches one
    pole (``[..., [180, 85], [180, 90], [-180, 90], [-180, 85]]``) keeps an outline.
    """
    if float(lons.max() - lons.min()) < 360.0:
        return
    north, south = bool((lats == 90.0).any()), bool((lats == -90.0).any())
    if north and south:
        raise InvalidArgument(
            field,
            "the ring spans all 360° of longitude from pole to pole; its edges at "
            "-180 and 180 are one meridian and collapse, leaving the whole world: a "
            "fence cannot cover the whole world or both poles",
        )
    if not (north or south):
        raise InvalidArgument(
            field,
            "the ring spans all 360° of longitude without reaching a pole; its edges "
            "at -180 and 180 are one meridian and collapse, leaving a band round the "
            "globe with no outline: a fence cannot go all the way round off the poles",
        )


def _close_over_pole(shell: np.ndarray) -> np.ndarray:
    """Close a ring that winds around the globe through the pole on its side."""
    pole = 90.0 if shell[:, 1].mean() >= 0 else -90.0
    start, end = shell[0], shell[-1]
    return np.vstack([shell, [end[0], pole], [start[0], pole], start])


def _split_at_antimeridian(geom: shapely.Geometry) -> shapely.Geometry:
    west, _, east, _ = geom.bounds
    if west >= -180.0 and east <= 180.0:
        return geom
    parts = []
    for k in range(
        math.floor((west + 180.0) / 360.0), math.floor((east + 180) / 360) + 1
    ):
        window = box(-180.0 + 360.0 * k, -90.0, 180.0 + 360.0 * k, 90.0)
        piece = shapely.transform(
            shapely.intersection(geom, window), lambda xy, k=k: xy - [360.0 * k, 0.0]
        )
        parts.extend(_polygons_of(piece))
    merged = _polygons_of(shapely.union_all(parts, grid_size=1e-11))
    return MultiPolygon(merged) if len(merged) > 1 else merged[0]


def _polygons_of(geom: shapely.Geometry) -> list[Polygon]:
    if geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    if geom.geom_type in {"MultiPolygon", "GeometryCollection"}:
        return [p for g in geom.geoms for p in _polygons_of(g)]
    return []


def _make_valid(geom: shapely.Geometry, field: str) -> shapely.Geometry:
    parts = _polygons_of(shapely.make_valid(geom))
    if not parts:
        raise InvalidArgument(field, "repair leaves no area")
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def _explain(reason: str) -> str:
    match = _WHERE.match(reason)
    if not match:
        return reason
    x, y = float(match["x"]), float(match["y"])
    lon = (x + 180.0) % 360.0 - 180.0
    what = (
        match["reason"].strip().lower().replace("self-intersection", "self-intersects")
    )
    if what.startswith("self-intersects"):
        what = "ring self-intersects"
    return f"{what} at lon {lon:.6g}, lat {y:.6g}"


def _pair(xy: np.ndarray) -> str:
    return f"[{xy[0]:.10g}, {xy[1]:.10g}]"


def _origin(unwrapped: shapely.Geometry) -> tuple[float, float]:
    """Centre of the metric projection: the centre of the unwrapped area.

    Parts given apart, more than 180 degrees of longitude from each other (a fence
    split at ±180 as RFC 7946 asks, with a part on each side), have no planar
    centre near them: the centre is then their mean direction on the sphere,
    each part's centre weighted by its area.
    """
    west, _, east, _ = unwrapped.bounds
    if east - west > 180.0 and unwrapped.geom_type == "MultiPolygon":
        parts = shapely.get_parts(unwrapped)
        centres = shapely.get_coordinates(shapely.centroid(parts))
        return _spherical_centre(centres, shapely.area(parts))
    centre = shapely.centroid(unwrapped)
    lon = (centre.x + 180.0) % 360.0 - 180.0
    return lon, float(np.clip(centre.y, -90.0, 90.0))


def _spherical_centre(lon_lat: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """The weighted mean direction of lon/lat points on the sphere, as lon/lat.

    >>> _spherical_centre(np.array([[175.0, 2.0], [-175.0, -2.0]]), np.ones(2))
    (180.0, 0.0)
    """
    lon, lat = np.radians(lon_lat[:, 0]), np.radians(lon_lat[:, 1])
    x = float(np.average(np.cos(lat) * np.cos(lon), weights=weights))
    y = float(np.average(np.cos(lat) * np.sin(lon), weights=weights))
    z = float(np.average(np.sin(lat), weights=weights))
    lon_deg = round(math.degrees(math.atan2(y, x)), 9)
    lat_deg = round(math.degrees(math.atan2(z, math.hypot(x, y))), 9)
    return (180.0 if lon_deg == -180.0 else lon_deg), lat_deg + 0.0


# Circles and corridors ---------------------------------------------------------------


def _circle(spec: ShapeSpec, field: str) -> Shape:
    check_lat_lon(spec.lat, spec.lon, f"{field}.center")
    radius = spec.radius_m
    if not (math.isfinite(radius) and 0.0 < radius <= MAX_RADIUS_M):
        raise InvalidArgument(
            f"{field}.radius_m", f"must be above 0 and at most {MAX_RADIUS_M:.0f} m"
        )
    outer = geodesic_ring(spec.lat, spec.lon, radius * 1.01 + 2.0)
    inner_radius = radius * 0.99 - 2.0
    core = (
        geodesic_ring(spec.lat, spec.lon, inner_radius)
        if inner_radius > 0
        else Polygon()
    )
    return Shape("circle", outer, core, spec.lon, spec.lat, radius)


def geodesic_ring(lat: float, lon: float, radius_m: float) -> shapely.Geometry:
    """A lon/lat polygon through points radius_m from the centre on the ellipsoid."""
    count = 256 if radius_m < 50_000 and abs(lat) < 80 else 2048
    azimuths = np.linspace(0.0, 360.0, count, endpoint=False)
    lons, lats, _ = GEOD.fwd(
        np.full(count, lon), np.full(count, lat), azimuths, np.full(count, radius_m)
    )
    ring = np.column_stack([lons, lats])
    ring = np.vstack([ring, ring[:1]])
    unwrapped, winds = _unwrap(ring[:, 0], ring[:, 1])
    shell = np.column_stack([unwrapped, ring[:, 1]])
    if winds:
        shell = _close_over_pole(shell)
    return _split_at_antimeridian(shapely.make_valid(Polygon(shell)))


def _corridor(spec: ShapeSpec, field: str) -> Shape:
    if len(spec.path) < 2:
        raise InvalidArgument(f"{field}.path", "a corridor needs at least 2 points")
    if len(spec.path) > MAX_CORRIDOR_POINTS:
        raise InvalidArgument(f"{field}.path", f"at most {MAX_CORRIDOR_POINTS} points")
    for i, (lat, lon) in enumerate(spec.path):
        check_lat_lon(lat, lon, f"{field}.path[{i}]")
    width = spec.width_m
    if not (math.isfinite(width) and 0.0 < width <= 100_000.0):
        raise InvalidArgument(f"{field}.width_m", "must be above 0 and at most 100 km")
    path = np.asarray(spec.path)
    lons, _ = _unwrap(path[:, 1], path[:, 0])
    mid = len(path) // 2
    origin_lon = (float(lons[mid]) + 180.0) % 360.0 - 180.0
    origin_lat = float(path[mid, 0])
    frame = metric_frame(origin_lon, origin_lat)
    x, y = frame.transform(path[:, 1], path[:, 0])
    line = shapely.linestrings(x, y)
    if line.length < 1e-6:
        line = shapely.points(x[0], y[0])
    band = shapely.segmentize(
        shapely.buffer(line, width / 2.0, quad_segs=16), width / 4
    )
    bx, by = shapely.get_coordinates(band.exterior).T
    lon_b, lat_b = frame.transform(bx, by, direction="INVERSE")
    ring_lons, winds = _unwrap(np.asarray(lon_b), np.asarray(lat_b))
    if winds:
        raise InvalidArgument(f"{field}.path", "a corridor may not wind around a pole")
    area = _split_at_antimeridian(
        shapely.make_valid(Polygon(np.column_stack([ring_lons, lat_b])))
    )
    return Shape("corridor", area, area, origin_lon, origin_lat)


def metric_frame(lon: float, lat: float) -> pyproj.Transformer:
    """Azimuthal equidistant projection at (lon, lat) on WGS84, metres (lon/lat in)."""
    return pyproj.Transformer.from_pipeline(
        f"+proj=aeqd +lat_0={lat:.9f} +lon_0={lon:.9f} +ellps=WGS84"
    )
