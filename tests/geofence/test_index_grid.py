"""The fence index's grid: rebuilt after one fence changed, it classifies only that
fence and answers exactly as an index built from nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely

from tracking_grpc.geofence import index as index_module
from tracking_grpc.geofence.index import CompiledFence, FenceIndex
from tracking_grpc.geofence.model import FenceSpec, ShapeSpec
from tracking_grpc.geofence.shapes import GEOD


def polygon(*rings) -> ShapeSpec:
    return ShapeSpec.geojson(
        json.dumps({"type": "Polygon", "coordinates": list(rings)})
    )


def fleet_fences(count: int) -> list[FenceSpec]:
    """Circles of a city, some overlapping, and polygons with holes among them."""
    rng = np.random.default_rng(7)
    specs = [
        FenceSpec(
            f"c{i}",
            ShapeSpec.circle(
                51.4 + rng.random() * 0.2,
                -0.2 + rng.random() * 0.3,
                50 + 400 * rng.random(),
            ),
        )
        for i in range(count)
    ]
    ring = [[-0.15, 51.45], [-0.05, 51.45], [-0.05, 51.52], [-0.15, 51.52]]
    hole = [[-0.12, 51.47], [-0.08, 51.47], [-0.08, 51.5], [-0.12, 51.5]]
    specs.append(FenceSpec("park", polygon(ring + ring[:1], hole + hole[:1])))
    return specs


def answers(index: FenceIndex, lon: np.ndarray, lat: np.ndarray) -> set:
    pts, rows = index.contains(lon, lat)
    return {(int(p), str(index.ids[r])) for p, r in zip(pts, rows, strict=True)}


def city_points(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    return -0.25 + rng.random(n) * 0.4, 51.38 + rng.random(n) * 0.25


def test_a_rebuild_classifies_only_the_changed_fence(monkeypatch) -> None:
    """Every fence write rebuilt the whole grid: about 0.4 s for 1,000 circles, in
    which the tenant's fixes waited for their events (a helper's trial had events
    half a minute late under steady fence edits)."""
    compiled = [CompiledFence.of(s) for s in fleet_fences(300)]
    FenceIndex(compiled)
    classified: list[int] = []
    classify = index_module._classify

    def counted(parts, part_row, core, bounds, dx, dy, wanted):
        classified.append(len(np.unique(part_row[wanted])))
        return classify(parts, part_row, core, bounds, dx, dy, wanted)

    monkeypatch.setattr(index_module, "_classify", counted)
    moved = FenceSpec("c3", ShapeSpec.circle(51.5, -0.1, 120.0), version=2)
    compiled[3] = CompiledFence.of(moved)
    kept = compiled[4].cells
    FenceIndex(compiled)
    assert classified == [1]
    assert compiled[4].cells is kept


def test_a_rebuilt_index_answers_as_one_built_from_nothing() -> None:
    specs = fleet_fences(300)
    compiled = [CompiledFence.of(s) for s in specs]
    FenceIndex(compiled)
    specs[3] = FenceSpec("c3", ShapeSpec.circle(51.5, -0.1, 120.0), version=2)
    specs[7] = FenceSpec("c7", ShapeSpec.circle(51.45, -0.02, 900.0), version=2)
    del specs[9], compiled[9]
    compiled[3], compiled[7] = CompiledFence.of(specs[3]), CompiledFence.of(specs[7])
    rebuilt = FenceIndex(compiled)
    fresh = FenceIndex.build(specs)
    lon, lat = city_points(50_000)
    got = answers(rebuilt, lon, lat)
    assert got == answers(fresh, lon, lat) == truth(specs, lon, lat)
    assert len(got) > 1_000  # the points do fall in fences


def truth(specs: list[FenceSpec], lon: np.ndarray, lat: np.ndarray) -> set:
    """(point, fence id) by brute force: a circle by geodesic distance from its
    centre, a polygon by its area."""
    found = set()
    for spec in specs:
        shape = spec.shape
        if shape.kind == "circle":
            n = lon.size
            _, _, dist = GEOD.inv(
                np.full(n, shape.lon), np.full(n, shape.lat), lon, lat
            )
            hits = np.flatnonzero(dist <= shape.radius_m)
        else:
            area = CompiledFence.of(spec).shape.area
            hits = np.flatnonzero(shapely.intersects_xy(area, lon, lat))
        found |= {(int(p), spec.fence_id) for p in hits}
    return found


@pytest.mark.parametrize(
    ("shape", "elsewhere"),
    [
        pytest.param(
            ShapeSpec.circle(0.0, 179.999, 500.0),
            ShapeSpec.circle(0.0, 10.0, 500.0),
            id="circle-on-the-seam",
        ),
        pytest.param(
            polygon([[170, -10], [-170, -10], [-170, 10], [170, 10], [170, -10]]),
            polygon([[0, -10], [20, -10], [20, 10], [0, 10], [0, -10]]),
            id="across-the-antimeridian",
        ),
        pytest.param(
            ShapeSpec.circle(-89.99, 0.0, 2_000.0),
            ShapeSpec.circle(-89.99, 120.0, 2_000.0),
            id="around-a-pole",
        ),
    ],
)
def test_a_fence_keeps_its_cells_when_another_moves_far_away(shape, elsewhere) -> None:
    """The lattice is fixed to 0° 0°, not to the corner of the tenant's fences:
    a fence keeps its cells when the fences' extent changes."""
    specs = [FenceSpec("a", shape), FenceSpec("b", shape)]
    compiled = [CompiledFence.of(s) for s in specs]
    FenceIndex(compiled)
    before = compiled[0].cells
    specs[1] = FenceSpec("b", elsewhere, version=2)
    compiled[1] = CompiledFence.of(specs[1])
    rebuilt = FenceIndex(compiled)
    assert compiled[0].cells is before
    rng = np.random.default_rng(3)
    for row in range(2):
        for part in shapely.get_parts(rebuilt.area[row]):  # two at ±180
            west, south, east, north = part.bounds
            lon = west + (east - west) * rng.random(5_000)
            lat = south + (north - south) * rng.random(5_000)
            got = answers(rebuilt, lon, lat)
            assert got == answers(FenceIndex.build(specs), lon, lat)
            assert any(fence == specs[row].fence_id for _, fence in got)
