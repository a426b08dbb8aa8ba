"""Shapes of every kind the field cases sample: antimeridian, poles, holes, invalid
rings, and circles measured on the ellipsoid."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from tracking_grpc.errors import InvalidArgument
from tracking_grpc.geofence.index import FenceIndex
from tracking_grpc.geofence.model import FenceSpec, ShapeSpec
from tracking_grpc.geofence.shapes import GEOD, compile_checked, compile_shape


def polygon(*rings) -> ShapeSpec:
    return ShapeSpec.geojson(
        json.dumps({"type": "Polygon", "coordinates": list(rings)})
    )


def inside(shape: ShapeSpec, points: list[tuple[float, float]]) -> list[bool]:
    """Containment of (lon, lat) points through the fence index."""
    index = FenceIndex.build([FenceSpec("f", shape)])
    lon, lat = np.array(points, dtype=float).T
    pts, _ = index.contains(lon, lat)
    return [i in set(pts.tolist()) for i in range(len(points))]


ACROSS_DATELINE = polygon([[170, -10], [-170, -10], [-170, 10], [170, 10], [170, -10]])
WIDE_OVER_GREENWICH = polygon(
    [[-120, -5], [0, -5], [120, -5], [120, 5], [0, 5], [-120, 5], [-120, -5]]
)
SOUTH_CAP_BY_EDGES = polygon([[0, -80], [120, -80], [-120, -80], [0, -80]])
NORTH_CAP_WITH_POLE = polygon(
    [[-180, 80], [0, 80], [180, 80], [180, 90], [-180, 90], [-180, 80]]
)


@pytest.mark.parametrize(
    ("shape", "points", "expected"),
    [
        pytest.param(
            ACROSS_DATELINE,
            [(179.9, 0), (-179.9, 0), (180, 5), (0, 0), (160, 0)],
            [True, True, True, False, False],
            id="across-180",
        ),
        pytest.param(
            WIDE_OVER_GREENWICH,
            [(100, 0), (-100, 0), (0, 0), (150, 0)],
            [True, True, True, False],
            id="wide-over-greenwich",
        ),
        pytest.param(
            SOUTH_CAP_BY_EDGES,
            [(-45, -85), (179, -89.9), (10, -75)],
            [True, True, False],
            id="south-cap-by-edges",
        ),
        pytest.param(
            NORTH_CAP_WITH_POLE,
            [(-170, 85), (10, 89.99), (10, 79)],
            [True, True, False],
            id="north-cap-with-pole",
        ),
        pytest.param(
            ShapeSpec.circle(0, 179.999, 5000),
            [(-179.99, 0), (179.9, 0)],
            [True, False],
            id="circle-across-180",
        ),
        pytest.param(
            ShapeSpec.circle(89.5, 20, 200_000),
            [(-160, 89.5), (20, 87.5)],
            [True, False],
            id="circle-over-pole",
        ),
        pytest.param(
            ShapeSpec.circle(-90, 0, 300_000),
            [(77, -87.5), (0, -87.2)],
            [True, False],
            id="circle-at-south-pole",
        ),
    ],
)
def test_areas_decided_by_edges(shape, points, expected) -> None:
    assert inside(shape, points) == expected


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(
            polygon([[-180, -5], [-170, -5], [-170, 5], [-180, 5], [-180, -5]]),
            id="edge-given-as-minus-180",
        ),
        pytest.param(
            polygon([[170, -5], [180, -5], [180, 5], [170, 5], [170, -5]]),
            id="edge-given-as-180",
        ),
    ],
)
def test_a_point_on_the_antimeridian_is_on_a_fence_edge_there(shape) -> None:
    """180 and -180 are one meridian: a point on it, written either way, lies on
    the edge of a fence that ends there, and edges count as inside."""
    assert inside(shape, [(180, 0), (-180, 0), (0, 0)]) == [True, True, False]


def split_at_180(south: float, north: float) -> ShapeSpec:
    """Two parts touching ±180, the way RFC 7946 asks a fence across it be split."""
    east = [[170, south], [180, south], [180, north], [170, north], [170, south]]
    west = [[-180, south], [-170, south], [-170, north], [-180, north]]
    geometry = {"type": "MultiPolygon", "coordinates": [[east], [[*west, west[0]]]]}
    return ShapeSpec.geojson(json.dumps(geometry))


@pytest.mark.parametrize(
    ("south", "north"),
    [
        pytest.param(-10, 10, id="on-the-equator"),
        pytest.param(-60, -50, id="south"),
        pytest.param(50, 51, id="north"),
    ],
)
def test_a_fence_split_at_180_is_one_fence_across_it(south, north) -> None:
    """Its parts' planar centre lies half a world away (at lon 0), where a metric
    frame cannot measure them: the frame is centred between them, on ±180."""
    mid = (south + north) / 2
    fence = FenceIndex.build([FenceSpec("f", split_at_180(south, north))]).fences[0]
    assert fence.shape.origin_lon == pytest.approx(180.0)
    degrees = min(20 * math.cos(math.radians(mid)), north - south)  # narrower way
    assert fence.size_m == pytest.approx(degrees / 2 * 111_200, rel=0.05)
    points = [(175, mid), (-175, mid), (180, mid), (0, mid), (160, mid)]
    assert inside(split_at_180(south, north), points) == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("lat", [0.0, 45.0, 60.0, 85.0])
@pytest.mark.parametrize("azimuth", [0.0, 45.0, 90.0, 200.0])
def test_circle_is_exact_on_the_ellipsoid(lat: float, azimuth: float) -> None:
    lons, lats, _ = GEOD.fwd([10.0] * 2, [lat] * 2, [azimuth] * 2, [99.9, 100.1])
    shape = ShapeSpec.circle(lat, 10.0, 100.0)
    assert inside(shape, list(zip(lons, lats, strict=True))) == [True, False]


HOLED = {
    "type": "MultiPolygon",
    "coordinates": [
        [
            [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]],
            [[1, 1], [3, 1], [3, 3], [1, 3], [1, 1]],
        ],
        [[[1.5, 1.5], [2.5, 1.5], [2.5, 2.5], [1.5, 2.5], [1.5, 1.5]]],
    ],
}


@pytest.mark.parametrize(
    ("shape", "points", "expected"),
    [
        pytest.param(
            ShapeSpec.geojson(json.dumps(HOLED)),
            [(0.5, 0.5), (1.2, 1.2), (2, 2)],
            [True, False, True],
            id="island-in-a-hole",
        ),
        pytest.param(
            ShapeSpec.wkt("POLYGON((0 0,4 0,4 4,0 4,0 0),(1 1,1 3,3 3,3 1,1 1))"),
            [(0.5, 0.5), (2, 2)],
            [True, False],
            id="wkt-hole",
        ),
        pytest.param(
            polygon(
                [[170, -10], [-170, -10], [-170, 10], [170, 10], [170, -10]],
                [[178, -1], [-178, -1], [-178, 1], [178, 1], [178, -1]],
            ),
            [(179.5, 0), (-179.5, 0), (175, 0)],
            [False, False, True],
            id="hole-across-180",
        ),
    ],
)
def test_holes_are_outside(shape, points, expected) -> None:
    assert inside(shape, points) == expected


OVERLAP = {
    "type": "MultiPolygon",
    "coordinates": [
        [[[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]],
        [[[1, 1], [3, 1], [3, 3], [1, 3], [1, 1]]],
    ],
}

BAND_ROUND_THE_GLOBE = [[-180, -80], [0, -80], [180, -80], [180, 80], [0, 80]]
BAND_ROUND_THE_GLOBE += [[-180, 80], [-180, -80]]


@pytest.mark.parametrize(
    ("shape", "field", "words"),
    [
        pytest.param(
            polygon([[0, 0], [2, 0], [1, 1], [2, 2], [0, 2], [1, 1], [0, 0]]),
            "s.geojson.coordinates",
            "self-intersects at lon 1, lat 1",
            id="figure-eight",
        ),
        pytest.param(
            polygon(
                [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]],
                [[5, 5], [6, 5], [6, 6], [5, 6], [5, 5]],
            ),
            "s.geojson.coordinates",
            "hole lies outside shell at lon 5",
            id="hole-outside",
        ),
        pytest.param(
            ShapeSpec.geojson(json.dumps(OVERLAP)),
            "s.geojson",
            "polygons overlap",
            id="overlapping-parts",
        ),
        pytest.param(
            polygon(
                [[0, 0], [1, 0], [1, 1], [0, 0]], [[0.1, 0.1], [0.2, 0.1], [0.2, 0.2]]
            ),
            "s.geojson.coordinates[1]",
            "not closed",
            id="open-hole",
        ),
        pytest.param(
            polygon([[0, 0], [1, 0], [0, 0]]),
            "s.geojson.coordinates[0]",
            "at least 4 positions",
            id="two-points",
        ),
        pytest.param(
            polygon([[0, 0], [1, 0], [1, 0], [0, 0]]),
            "s.geojson.coordinates[0]",
            "at least 4",
            id="repeated-positions",
        ),
        pytest.param(
            polygon([[0, 0], [181, 0], [1, 1], [0, 0]]),
            "s.geojson.coordinates[0][1]",
            "longitude 181",
            id="longitude",
        ),
        pytest.param(
            polygon([[0, 0], [1, -91], [1, 1], [0, 0]]),
            "s.geojson.coordinates[0][1]",
            "latitude -91",
            id="latitude",
        ),
        pytest.param(
            polygon([[0, 0], [1, "x"], [1, 1], [0, 0]]),
            "s.geojson.coordinates[0][1]",
            "numbers",
            id="not-a-number",
        ),
        pytest.param(
            ShapeSpec.wkt("POLYGON((0 0, 1 0, 1 1, 0 1))"),
            "s.wkt",
            "closed",
            id="wkt-unclosed",
        ),
        pytest.param(
            ShapeSpec.wkt("POLYGON((-180 -90, 180 -90, 180 90, -180 90, -180 -90))"),
            "s.wkt[0]",
            "a fence cannot cover the whole world or both poles",
            id="whole-world",
        ),
        pytest.param(
            polygon([[-180, -10], [180, -10], [180, 10], [-180, 10], [-180, -10]]),
            "s.geojson.coordinates[0]",
            "the edge from [-180, -10] to [180, -10] spans all 360° of longitude",
            id="edge-from-minus-180-to-180",
        ),
        pytest.param(
            polygon([[-180, 0], [180, 0], [180, 90], [-180, 90], [-180, 0]]),
            "s.geojson.coordinates[0]",
            "collapses to a point on the antimeridian",
            id="cap-with-an-edge-of-360",
        ),
        pytest.param(
            polygon(BAND_ROUND_THE_GLOBE),
            "s.geojson.coordinates[0]",
            "spans all 360° of longitude without reaching a pole",
            id="band-round-the-globe",
        ),
        pytest.param(
            polygon(
                [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]],
                [[-180, 1], [180, 1], [180, 2], [-180, 2], [-180, 1]],
            ),
            "s.geojson.coordinates[1]",
            "spans all 360° of longitude",
            id="hole-with-an-edge-of-360",
        ),
        pytest.param(
            ShapeSpec.circle(10, 10, 0),
            "s.circle.radius_m",
            "above 0",
            id="zero-radius",
        ),
        pytest.param(
            ShapeSpec.corridor([(10, 10)], 20),
            "s.corridor.path",
            "2 points",
            id="one-point-corridor",
        ),
        pytest.param(
            ShapeSpec.corridor([(10, 10 + i * 1e-4) for i in range(20_001)], 20),
            "s.corridor.path",
            "at most 20000 points",
            id="corridor-too-long",
        ),
    ],
)
def test_invalid_shapes_name_what_and_where(shape, field, words) -> None:
    with pytest.raises(InvalidArgument) as caught:
        compile_shape(shape, "s")
    assert caught.value.field == field
    assert words in caught.value.reason


@pytest.mark.parametrize(
    ("shape", "points", "expected"),
    [
        pytest.param(
            polygon(
                [
                    [13.4, 52.5],
                    [13.41, 52.51],
                    [13.41, 52.5],
                    [13.4, 52.51],
                    [13.4, 52.5],
                ]
            ),
            [(13.408, 52.505), (13.402, 52.505), (13.405, 52.5025)],
            [True, True, False],
            id="bowtie-both-lobes",
        ),
        pytest.param(
            polygon([[0, 0], [1, 0], [1, 1], [0, 1]]),
            [(0.5, 0.5)],
            [True],
            id="closes-open-ring",
        ),
        pytest.param(
            ShapeSpec.geojson(json.dumps(OVERLAP)),
            [(2.5, 2.5), (0.5, 0.5)],
            [True, True],
            id="merges-overlaps",
        ),
    ],
)
def test_repair_keeps_the_whole_area(shape, points, expected) -> None:
    repaired = compile_checked(shape, "s", repair=True)
    assert repaired.repairs
    assert inside(repaired.spec, points) == expected


def test_corridor_is_width_metres_wide() -> None:
    shape = ShapeSpec.corridor([(53.40, -2.90), (53.41, -2.90)], 40.0)
    lons, lats, _ = GEOD.fwd([-2.90] * 2, [53.405] * 2, [90.0] * 2, [19.5, 20.5])
    assert inside(shape, list(zip(lons, lats, strict=True))) == [True, False]


def test_a_long_narrow_corridor_indexes_in_seconds() -> None:
    """A 220 km road given by its two ends, 100 m wide: its band has some 18,000
    vertices, which every grid cell along it is tested against (minutes of CPU
    when each test walked every vertex)."""
    road = ShapeSpec.corridor([(0.0, 0.0), (0.0, 2.0)], 100.0)
    started = time.process_time()
    assert inside(road, [(1.0, 0.0), (1.0, 0.01)]) == [True, False]
    assert time.process_time() - started < 10.0


def test_a_refused_ring_is_named_by_its_place_after_a_dropped_one() -> None:
    """Repair drops a hole with no area; a later ring refused is still named by
    its place in the request, not by its place among the rings kept."""
    outer = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    no_area = [[1, 1], [1, 1], [1, 1], [1, 1]]
    round_the_globe = [[-180, 1], [180, 1], [180, 2], [-180, 2], [-180, 1]]
    rings = [outer, no_area, round_the_globe]
    spec = ShapeSpec.geojson(json.dumps({"type": "Polygon", "coordinates": rings}))
    with pytest.raises(InvalidArgument) as refused:
        compile_checked(spec, "s", repair=True)
    assert refused.value.field == "s.geojson.coordinates[2]"
