"""An index of one tenant's fences, queried with arrays of points and segments.

Containment goes through a grid of cells first: a cell that touches no fence answers
"in none", a cell wholly inside exactly one fence and touching no other answers "in that
one"; only points in the remaining cells (near an edge, or where fences overlap) get the
exact test (a prepared STRtree query; geodesic distance for circles). Distances in
metres come from each fence's own azimuthal equidistant projection (exact from the
centre of a circle, which is measured on the ellipsoid).

>>> from tracking_grpc.geofence.model import FenceSpec, ShapeSpec
>>> index = FenceIndex.build([FenceSpec("a", ShapeSpec.circle(52.52, 13.405, 100.0))])
>>> pts, rows = index.contains(np.array([13.405, 13.5]), np.array([52.52, 52.52]))
>>> pts.tolist(), rows.tolist()
([0], [0])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import shapely
from shapely import STRtree

from tracking_grpc.errors import InvalidArgument
from tracking_grpc.events import EventType
from tracking_grpc.geofence.model import FenceSpec
from tracking_grpc.geofence.shapes import GEOD, Shape, compile_shape, metric_frame

log = logging.getLogger(__name__)

MAX_GRID_CELLS = 1 << 24
MAX_CLASSIFIED_PAIRS = 12_000_000
_CHUNK = 200_000
_EPS_DEG = 1e-9
MIN_AREA_M2 = 1.0  # smaller areas vanish on the metric grid (1 mm) evaluation uses


@dataclass(eq=False)
class CompiledFence:
    """A fence ready for evaluation: its spec, area and derived values."""

    spec: FenceSpec
    shape: Shape
    # The grid cells the fence touches on the lattice of the last index built with
    # it: a rebuild after another fence changed classifies only that one.
    cells: _FenceCells | None = field(default=None, repr=False)

    @classmethod
    def of(cls, spec: FenceSpec) -> CompiledFence:
        return cls(spec, compile_shape(spec.shape))

    @cached_property
    def frame(self):
        return metric_frame(self.shape.origin_lon, self.shape.origin_lat)

    @cached_property
    def metric_area(self) -> shapely.Geometry:
        """The area in the fence's metric projection (seams at ±180 and poles gone)."""
        area = self.shape.area
        west, south, east, north = area.bounds
        step = max(0.01, (east - west + north - south) / 5000.0)
        parts = _project(self.frame, shapely.segmentize(area, step))
        return shapely.buffer(shapely.union_all(parts, grid_size=1e-3), 0.0)

    @cached_property
    def metric_boundary(self) -> shapely.Geometry:
        """The area's edge in the fence's metric projection."""
        boundary = shapely.boundary(self.metric_area)
        shapely.prepare(boundary)
        return boundary

    @cached_property
    def size_m(self) -> float:
        """Radius of the largest circle inside the fence (a circle's own radius)."""
        if self.shape.kind == "circle":
            return self.shape.radius_m
        parts = shapely.get_parts(self.metric_area)
        return max(
            (shapely.length(shapely.maximum_inscribed_circle(p, 0.1)) for p in parts),
            default=0.0,
        )

    @property
    def enter_limit_m(self) -> float:
        """Fixes less accurate than this never enter the fence."""
        return self.spec.max_accuracy_m or self.size_m

    def check_measurable(self, field: str) -> None:
        """Raise InvalidArgument naming ``field`` unless the area keeps an area of at
        least ``MIN_AREA_M2`` in the fence's metric projection (where evaluation
        measures it). A circle's radius is checked where it is parsed, and
        evaluation measures it on the ellipsoid."""
        if self.shape.kind == "circle":
            return
        try:
            area_m2 = float(shapely.area(self.metric_area))
            corners = shapely.get_coordinates(self.metric_area)
        except shapely.errors.GEOSException as exc:
            raise InvalidArgument(field, f"the area cannot be measured: {exc}") from exc
        if not np.isfinite(corners).all() or not math.isfinite(area_m2):
            raise InvalidArgument(field, "the area cannot be measured in metres")
        if area_m2 < MIN_AREA_M2:
            raise InvalidArgument(
                field, f"the area is {area_m2:.3g} m²; a fence needs at least 1 m²"
            )

    def warm(self) -> CompiledFence:
        """Work out now what evaluation would otherwise work out on first use: for
        a huge polygon or corridor, seconds that belong in the thread building the
        index, not in the event loop evaluating fixes."""
        if self.shape.kind != "circle":
            _ = self.metric_boundary, self.enter_limit_m
        return self


def compile_usable(spec: FenceSpec) -> CompiledFence | None:
    """The fence compiled and warmed; None, logged, when that fails.

    Create and update check every fence (:meth:`CompiledFence.check_measurable`),
    but one stored before a check existed must not take its tenant's other fences
    down with it: it is left out of the index, and the log names it.
    """
    try:
        return CompiledFence.of(spec).warm()
    except Exception:
        log.exception(
            "fence %s (version %d) cannot be evaluated and is left out of its "
            "tenant's index; update or delete it",
            spec.fence_id,
            spec.version,
        )
        return None


def _project(frame, geom: shapely.Geometry) -> list[shapely.Geometry]:
    """The polygons of a lon/lat geometry in a metric frame."""
    return [
        shapely.transform(p, lambda xy: np.column_stack(frame.transform(*xy.T)))
        for p in shapely.get_parts(geom)
    ]


def _own(geoms: list[shapely.Geometry]) -> np.ndarray:
    """New GEOS objects equal to ``geoms``, coordinate for coordinate."""
    return shapely.transform(np.array(geoms, dtype=object), lambda xy: xy)


class FenceIndex:
    """Fences of one tenant, indexed for array queries; rows are positions in it."""

    def __init__(self, fences: Sequence[CompiledFence]) -> None:
        self.fences = list(fences)
        self.ids = np.array([f.spec.fence_id for f in fences], dtype=object)
        self.row_of = {fid: i for i, fid in enumerate(self.ids)}
        shapes = [f.shape for f in fences]
        self.is_circle = np.array([s.kind == "circle" for s in shapes], dtype=bool)
        self.centre_lon = np.array([s.origin_lon for s in shapes], dtype=np.float64)
        self.centre_lat = np.array([s.origin_lat for s in shapes], dtype=np.float64)
        self.radius_m = np.array([s.radius_m for s in shapes], dtype=np.float64)
        self.dwell_ms = np.array([f.spec.dwell_ms for f in fences], dtype=np.int64)
        self.emits = {
            kind: np.array([kind in f.spec.emits() for f in fences], dtype=bool)
            for kind in (
                EventType.ENTER,
                EventType.EXIT,
                EventType.DWELL,
                EventType.CROSS,
            )
        }
        self.scheduled = np.array([f.spec.schedule is not None for f in fences], bool)
        # Copies of their own: GEOS prepared geometries are not thread-safe, and a
        # rebuild in a worker thread must not test cells against the very objects
        # the index in use is being queried with (that crashed the process).
        self.area = _own([s.area for s in shapes])
        self.core = _own([s.core for s in shapes])
        shapely.prepare(self.area)
        shapely.prepare(self.core)
        self.tree = STRtree(self.area)
        self.grid = _Grid.build(self.area, self.core, self.fences)
        self._enter_limit_m = np.full(len(fences), np.nan)

    @classmethod
    def build(cls, specs: Sequence[FenceSpec]) -> FenceIndex:
        """The index of ``specs``, leaving out any fence that cannot be evaluated
        (:func:`compile_usable`)."""
        compiled = (compile_usable(s) for s in specs)
        return cls([fence for fence in compiled if fence is not None])

    def __len__(self) -> int:
        return len(self.fences)

    def enter_limits_m(self, rows: np.ndarray) -> np.ndarray:
        """Enter limit of each row's fence, worked out the first time it is needed."""
        missing = rows[np.isnan(self._enter_limit_m[rows])]
        for row in np.unique(missing).tolist():
            self._enter_limit_m[row] = self.fences[row].enter_limit_m
        return self._enter_limit_m[rows]

    def contains(
        self, lon: np.ndarray, lat: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(point, fence row) pairs where the fence contains the point (edges included).

        Sorted by point, then row.
        """
        lon = np.asarray(lon, dtype=np.float64)
        lat = np.asarray(lat, dtype=np.float64)
        if len(self) == 0 or lon.size == 0:
            return np.empty(0, np.intp), np.empty(0, np.intp)
        pts, rows = self._contains(lon, lat)
        seam = np.flatnonzero(np.abs(lon) == 180.0)
        if seam.size:  # one meridian, two numbers: fences on either side may hold it
            other_pts, other_rows = self._contains(-lon[seam], lat[seam])
            pairs = np.unique(
                np.column_stack([np.r_[pts, seam[other_pts]], np.r_[rows, other_rows]]),
                axis=0,
            )
            pts, rows = pairs[:, 0], pairs[:, 1]
        return pts, rows

    def _contains(
        self, lon: np.ndarray, lat: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        code = self.grid.lookup(lon, lat)
        sure = np.flatnonzero(code > 0)
        exact = np.flatnonzero(code < 0)
        ex_pts, ex_rows = self._exact(exact, lon[exact], lat[exact])
        pts = np.concatenate([sure, ex_pts])
        rows = np.concatenate([code[sure] - 1, ex_rows]).astype(np.intp)
        order = np.lexsort((rows, pts))
        return pts[order], rows[order]

    def _exact(
        self, which: np.ndarray, lon: np.ndarray, lat: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Containment for points whose cell needs a look at the fences touching it."""
        if which.size == 0:
            return np.empty(0, np.intp), np.empty(0, np.intp)
        pts, rows, sure = self.grid.candidates(lon, lat)
        keep = sure.copy()
        test = np.flatnonzero(~sure)
        test = test[np.argsort(rows[test], kind="stable")]  # one fence at a time: fast
        circle = self.is_circle[rows[test]]
        polygons = test[~circle]
        keep[polygons] = shapely.intersects_xy(
            self.area[rows[polygons]], lon[pts[polygons]], lat[pts[polygons]]
        )
        circles = test[circle]
        if circles.size:
            cr, cp = rows[circles], pts[circles]
            _, _, dist = GEOD.inv(
                self.centre_lon[cr], self.centre_lat[cr], lon[cp], lat[cp]
            )
            keep[circles] = dist <= self.radius_m[cr]
        return which[pts[keep]], rows[keep]

    def edge_distance_m(
        self, lon: np.ndarray, lat: np.ndarray, rows: np.ndarray
    ) -> np.ndarray:
        """Distance in metres from each point to the edge of its fence (unsigned)."""
        dist = np.zeros(len(rows), dtype=np.float64)
        circle = self.is_circle[rows]
        if circle.any():
            cr = rows[circle]
            _, _, d = GEOD.inv(
                self.centre_lon[cr], self.centre_lat[cr], lon[circle], lat[circle]
            )
            dist[circle] = np.abs(d - self.radius_m[cr])
        for group in _by_row(rows, np.flatnonzero(~circle)):
            fence = self.fences[rows[group[0]]]
            x, y = fence.frame.transform(lon[group], lat[group])
            dist[group] = shapely.distance(fence.metric_boundary, shapely.points(x, y))
        return dist

    def near(self, lon: float, lat: float, radius_m: float) -> np.ndarray:
        """Rows of fences whose box lies within about radius_m of a point."""
        dlat = radius_m / 110_574.0 + _EPS_DEG
        dlon = radius_m / (111_320.0 * max(math.cos(math.radians(lat)), 1e-6))
        dlon = min(dlon + _EPS_DEG, 360.0)
        boxes = [shapely.box(lon - dlon, lat - dlat, lon + dlon, lat + dlat)]
        for shift in (-360.0, 360.0):
            if abs(lon + shift) - dlon < 180.0:
                boxes.append(
                    shapely.box(
                        lon + shift - dlon, lat - dlat, lon + shift + dlon, lat + dlat
                    )
                )
        _, rows = self.tree.query(boxes)
        return np.unique(rows)

    def crossed(
        self, lon0: np.ndarray, lat0: np.ndarray, lon1: np.ndarray, lat1: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(segment, fence row) pairs where the straight segment meets the fence."""
        if len(self) == 0 or lon0.size == 0:
            return np.empty(0, np.intp), np.empty(0, np.intp)
        step = lon1 - lon0
        wraps = np.abs(step) > 180.0
        lon1 = np.where(wraps, lon1 - 360.0 * np.sign(step), lon1)
        coords = np.stack(
            [np.column_stack([lon0, lat0]), np.column_stack([lon1, lat1])], axis=1
        )
        lines = shapely.linestrings(coords)
        segs, rows = self.tree.query(lines, predicate="intersects")
        if wraps.any():
            shifted = shapely.transform(
                lines[wraps], lambda xy: xy + np.array([360.0, 0.0])
            )
            back = shapely.transform(
                lines[wraps], lambda xy: xy - np.array([360.0, 0.0])
            )
            idx = np.flatnonzero(wraps)
            for extra in (shifted, back):
                s, r = self.tree.query(extra, predicate="intersects")
                segs, rows = np.concatenate([segs, idx[s]]), np.concatenate([rows, r])
        keep = ~self.is_circle[rows]
        for group in _by_row(rows, np.flatnonzero(~keep)):
            row, s = rows[group[0]], segs[group]
            frame = self.fences[row].frame
            x0, y0 = frame.transform(lon0[s], lat0[s])
            x1, y1 = frame.transform(lon1[s], lat1[s])
            ends = np.stack([np.column_stack([x0, y0]), np.column_stack([x1, y1])], 1)
            centre = shapely.Point(0.0, 0.0)
            keep[group] = (
                shapely.distance(centre, shapely.linestrings(ends))
                <= (self.radius_m[row])
            )
        segs, rows = segs[keep], rows[keep]
        pairs = np.unique(np.column_stack([segs, rows]), axis=0)
        return pairs[:, 0], pairs[:, 1]


@dataclass(frozen=True, slots=True)
class _Grid:
    """Cells in lon/lat: 0 none, -1 look at the cell's fences, k > 0 inside row k-1.

    For the -1 cells, ``pair_cell``/``pair_row``/``pair_sure`` list the fences that
    touch the cell (sorted by cell); ``pair_sure`` marks those that contain it wholly.
    """

    west: float
    south: float
    dx: float
    dy: float
    nx: int
    ny: int
    code: np.ndarray  # int32, ny * nx
    pair_cell: np.ndarray  # int64, sorted
    pair_row: np.ndarray  # intp
    pair_sure: np.ndarray  # bool

    @classmethod
    def build(
        cls, area: np.ndarray, core: np.ndarray, fences: Sequence[CompiledFence]
    ) -> _Grid:
        """The grid of fences ``area`` (rows as in ``fences``, whose cells found on
        the same lattice before are reused, and whose new ones are kept)."""
        empty = np.empty(0, np.int64)
        if len(area) == 0:
            return cls(
                0.0,
                0.0,
                1.0,
                1.0,
                0,
                0,
                np.zeros(0, np.int32),
                empty,
                empty,
                np.empty(0, bool),
            )
        # Parts one at a time: a fence split at ±180 has two small boxes, not one
        # spanning the globe.
        parts, part_row = shapely.get_parts(area, return_index=True)
        bounds = shapely.bounds(parts)
        dx, dy, lo, hi = _lattice(bounds)
        reused = [_reusable(f.cells, dx, dy) for f in fences]
        stale = np.array([cells is None for cells in reused])
        fresh = _classify(parts, part_row, core, bounds, dx, dy, stale[part_row])
        gx, gy, owner, whole = [], [], [], []
        for row, fence in enumerate(fences):
            known = reused[row] or fresh[row]
            fence.cells = known
            gx.append(known.gx)
            gy.append(known.gy)
            owner.append(np.full(known.gx.size, row, dtype=np.intp))
            whole.append(known.sure)
        x0, y0 = int(lo[0]), int(lo[1])
        nx, ny = int(hi[0]) - x0 + 1, int(hi[1]) - y0 + 1
        local = (np.concatenate(gy) - y0) * nx + (np.concatenate(gx) - x0)
        cell, row_of_pair, sure = _merge_parts(
            local, np.concatenate(owner), np.concatenate(whole)
        )
        touches = np.bincount(cell, minlength=nx * ny)
        code = np.where(touches > 0, -1, 0).astype(np.int32)
        alone = sure & (touches[cell] == 1)
        code[cell[alone]] = row_of_pair[alone] + 1
        keep = code[cell] < 0
        order = np.argsort(cell[keep], kind="stable")
        log.debug(
            "fence grid %dx%d, %d pairs, %d fences classified",
            nx,
            ny,
            cell.size,
            int(stale.sum()),
        )
        return cls(
            x0 * dx,
            y0 * dy,
            dx,
            dy,
            nx,
            ny,
            code,
            cell[keep][order],
            row_of_pair[keep][order],
            sure[keep][order],
        )

    def cells(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Cell number of each point, -1 outside the grid."""
        ix = np.floor((lon - self.west) / self.dx).astype(np.int64)
        iy = np.floor((lat - self.south) / self.dy).astype(np.int64)
        valid = (ix >= 0) & (ix < self.nx) & (iy >= 0) & (iy < self.ny)
        return np.where(valid, iy * self.nx + ix, -1)

    def lookup(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        cell = self.cells(lon, lat)
        if self.code.size == 0:
            return np.zeros(cell.shape, dtype=np.int32)
        return np.where(cell >= 0, self.code[cell.clip(0)], 0)

    def candidates(
        self, lon: np.ndarray, lat: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(point, row, sure) for points in -1 cells: the fences touching their cell."""
        cell = self.cells(lon, lat)
        first = np.searchsorted(self.pair_cell, cell)
        last = np.searchsorted(self.pair_cell, cell, side="right")
        counts = last - first
        pts = np.repeat(np.arange(cell.size), counts)
        at = np.repeat(first, counts) + (
            np.arange(pts.size) - np.repeat(np.cumsum(counts) - counts, counts)
        )
        return pts, self.pair_row[at], self.pair_sure[at]


@dataclass(frozen=True, slots=True)
class _FenceCells:
    """Cells of the lattice (dx, dy) one fence touches, numbered from 0 at 0° 0°;
    ``sure`` where a cell lies wholly inside it. A cell touched by two parts of
    the fence is listed twice."""

    dx: float
    dy: float
    gx: np.ndarray  # int64
    gy: np.ndarray  # int64
    sure: np.ndarray  # bool


def _reusable(cells: _FenceCells | None, dx: float, dy: float) -> _FenceCells | None:
    return cells if cells is not None and (cells.dx, cells.dy) == (dx, dy) else None


def _lattice(bounds: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Cell width and height (powers of two degrees, so that a fence's cells stay
    the same whatever other fences come and go), and the lowest and highest cell
    (x, y) of the parts with ``bounds``.

    Cells are about a sixteenth of the median fence high (within a factor of
    1.4) and about as wide as high on
    the ground, and made coarser until the grid and its classified pairs fit the
    limits.
    """
    south, north = bounds[:, 1].min(), bounds[:, 3].max()
    sizes = np.maximum(bounds[:, 3] - bounds[:, 1], 1e-7)
    mid = math.cos(math.radians(np.clip((south + north) / 2, -89.0, 89.0)))
    y_exp = round(math.log2(float(np.median(sizes)) / 16.0))
    x_exp = y_exp + round(-math.log2(max(mid, 0.01)))
    while True:
        dx, dy = 2.0**x_exp, 2.0**y_exp
        x0, y0, x1, y1 = _cell_ranges(bounds, dx, dy)
        cells = (int(x1.max() - x0.min()) + 1) * (int(y1.max() - y0.min()) + 1)
        pairs = int(((x1 - x0 + 1) * (y1 - y0 + 1)).sum())
        if cells <= MAX_GRID_CELLS and pairs <= MAX_CLASSIFIED_PAIRS:
            lo = np.array([x0.min(), y0.min()])
            hi = np.array([x1.max(), y1.max()])
            return dx, dy, lo, hi
        x_exp, y_exp = x_exp + 1, y_exp + 1


def _classify(
    parts: np.ndarray,
    part_row: np.ndarray,
    core: np.ndarray,
    bounds: np.ndarray,
    dx: float,
    dy: float,
    wanted: np.ndarray,
) -> dict[int, _FenceCells]:
    """The cells of the fences of the ``wanted`` parts, by fence row: each cell
    of a part's bounding box tested against the part (touches) and the fence's
    core (wholly inside)."""
    which = np.flatnonzero(wanted)
    if which.size == 0:
        return {}
    parts, rows, bounds = parts[which], part_row[which], bounds[which]
    # Prepared, each cell test is a lookup in the part's edge index instead of a
    # walk over all its vertices (a long corridor has tens of thousands).
    shapely.prepare(parts)
    x0, y0, x1, y1 = _cell_ranges(bounds, dx, dy)
    counts = (x1 - x0 + 1) * (y1 - y0 + 1)
    part = np.repeat(np.arange(len(parts)), counts)
    offset = np.arange(part.size) - np.repeat(np.cumsum(counts) - counts, counts)
    width = (x1 - x0 + 1)[part]
    gx = x0[part] + offset % width
    gy = y0[part] + offset // width
    touched, sure = [], []
    for start in range(0, part.size, _CHUNK):
        chunk = slice(start, start + _CHUNK)
        p, cx, cy = part[chunk], gx[chunk], gy[chunk]
        boxes = shapely.box(
            cx * dx - _EPS_DEG,
            cy * dy - _EPS_DEG,
            (cx + 1) * dx + _EPS_DEG,
            (cy + 1) * dy + _EPS_DEG,
        )
        touch = shapely.intersects(parts[p], boxes)
        inside = np.zeros(touch.size, dtype=bool)
        inside[touch] = shapely.contains_properly(core[rows[p[touch]]], boxes[touch])
        touched.append(touch)
        sure.append(inside)
    touch, inside = np.concatenate(touched), np.concatenate(sure)
    owner = rows[part]
    found = {}
    for group in _by_row(owner, np.flatnonzero(touch)):
        found[int(owner[group[0]])] = _FenceCells(
            dx, dy, gx[group], gy[group], inside[group]
        )
    for row in np.unique(rows).tolist():  # a fence no cell touched (degenerate)
        found.setdefault(row, _FenceCells(dx, dy, *_NO_CELLS))
    return found


_NO_CELLS = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, bool))


def _merge_parts(
    cell: np.ndarray, row: np.ndarray, sure: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (cell, fence) pair where several parts of a fence touch a cell."""
    key = cell * (int(row.max(initial=0)) + 1) + row
    order = np.argsort(key, kind="stable")
    key, cell, row, sure = key[order], cell[order], row[order], sure[order]
    first = np.ones(key.size, dtype=bool)
    first[1:] = key[1:] != key[:-1]
    starts = np.flatnonzero(first)
    merged = np.logical_or.reduceat(sure, starts) if key.size else sure
    return cell[first], row[first], merged


def _by_row(rows: np.ndarray, which: np.ndarray) -> list[np.ndarray]:
    """The indices ``which`` split into groups of one fence row each."""
    if which.size == 0:
        return []
    order = which[np.argsort(rows[which], kind="stable")]
    return np.split(order, np.flatnonzero(np.diff(rows[order])) + 1)


def _cell_ranges(
    bounds: np.ndarray, dx: float, dy: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The lowest and highest cell (x, y) each bounding box reaches."""
    x0 = np.floor(bounds[:, 0] / dx - 1e-9).astype(np.int64)
    y0 = np.floor(bounds[:, 1] / dy - 1e-9).astype(np.int64)
    x1 = np.floor(bounds[:, 2] / dx + 1e-9).astype(np.int64)
    y1 = np.floor(bounds[:, 3] / dy + 1e-9).astype(np.int64)
    return x0, y0, x1, y1
