"""Coarse positions: fixes snapped to a grid of cells about ``precision_m`` across.

A caller limited to a precision sees every position as the centre of its grid cell.
The grid is fixed (the same point always lands in the same cell, on every path and
every server), so answers agree with one another and repeating a question reveals
nothing new. Rows of cells are ``precision_m`` or a little more tall; each row is cut
into as many cells as fit ``precision_m`` or more wide along its central parallel
(one cell for a row around a pole), so that cells stay about square at every
latitude and the antimeridian is a cell edge.

Reported accuracy is widened by the distance from a cell's centre to its farthest
corner: a coarse position never claims more than its cell allows. Speed, heading
and altitude are withheld (NaN): integrated over time they would trace the path
inside the cells. For the same reason activity events carry no speeds and ETAs
are rounded (:func:`round_eta_ms`).

>>> lat, lon, bound = snap([53.40712], [-2.98211], 1_000.0)
>>> round(float(lat[0]), 4), round(float(lon[0]), 4), round(float(bound[0]))
(53.4109, -2.9799, 707)
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from numpy.typing import ArrayLike

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.core.geodesy import EARTH_RADIUS_M, haversine_m

METRES_PER_DEGREE = EARTH_RADIUS_M * math.pi / 180.0
MAX_PRECISION_M = 1_000_000.0
MIN_PRECISION_M = 1.0  # a finer grid shows a fix as it is (and overflows below ~1e-300)
# An ETA is rounded to the time a vehicle at this speed takes to cross a cell (and to
# a whole minute at least), so that it places the device on its route no finer than
# the grid does.
ETA_REFERENCE_SPEED_MPS = 10.0
# A cell's centre lies within SLACK times precision_m of every point of the cell
# (at most about 2.3: a cell next to a pole, twice as wide at its equator edge).
SLACK = 3.0


def snap(
    lat: ArrayLike, lon: ArrayLike, precision_m: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell centres of the points and, per point, the distance in metres from the
    centre to the farthest corner of its cell."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    rows = max(1.0, math.floor(180.0 * METRES_PER_DEGREE / precision_m))
    row_deg = 180.0 / rows
    row = np.clip(np.floor((lat + 90.0) / row_deg), 0.0, rows - 1.0)
    center_lat = -90.0 + (row + 0.5) * row_deg
    around_m = 360.0 * METRES_PER_DEGREE * np.cos(np.radians(center_lat))
    cols = np.maximum(1.0, np.floor(around_m / precision_m))
    col_deg = 360.0 / cols
    col = np.mod(np.floor((lon + 180.0) / col_deg), cols)
    center_lon = -180.0 + (col + 0.5) * col_deg
    widest_lat = np.maximum(np.abs(center_lat) - row_deg / 2.0, 0.0)
    width_m = col_deg * METRES_PER_DEGREE * np.cos(np.radians(widest_lat))
    bound_m = np.hypot(row_deg * METRES_PER_DEGREE, width_m) / 2.0
    return center_lat, center_lon, bound_m


def coarsen(batch: FixBatch, precision_m: float) -> FixBatch:
    """The batch as a caller limited to ``precision_m`` may see it; 0: unchanged."""
    if precision_m <= 0 or len(batch) == 0:
        return batch
    lat, lon, bound_m = snap(batch.lat, batch.lon, precision_m)
    accuracy = batch.accuracy_m.astype(np.float64)
    widened = np.where(np.isnan(accuracy), bound_m, accuracy + bound_m)
    withheld = np.full(len(batch), np.nan, dtype=np.float32)
    return replace(
        batch,
        lat=lat,
        lon=lon,
        accuracy_m=widened.astype(np.float32),
        altitude_m=withheld,
        speed_mps=withheld,
        heading_deg=withheld,
    )


def resnap(batch: FixBatch, precision_m: float) -> FixBatch:
    """Positions derived from coarse fixes (a smoothed track) put back on the grid,
    claiming no more accuracy than a cell allows; coarse fixes stay as they are."""
    if precision_m <= 0 or len(batch) == 0:
        return batch
    lat, lon, bound_m = snap(batch.lat, batch.lon, precision_m)
    accuracy = np.fmax(batch.accuracy_m.astype(np.float64), bound_m)
    return replace(batch, lat=lat, lon=lon, accuracy_m=accuracy.astype(np.float32))


def round_m(metres: ArrayLike, precision_m: float) -> np.ndarray:
    """Distances rounded to whole multiples of ``precision_m`` (0: unchanged)."""
    metres = np.asarray(metres, dtype=np.float64)
    if precision_m <= 0:
        return metres
    return np.round(metres / precision_m) * precision_m


def round_eta_ms(eta_ms: int, from_ms: int, precision_m: float) -> int:
    """An ETA as a caller limited to ``precision_m`` may see it: the time left after
    ``from_ms`` rounded up to a whole step of ``precision_m`` at
    ``ETA_REFERENCE_SPEED_MPS``, a minute at least (0: unchanged)."""
    if precision_m <= 0 or eta_ms <= from_ms:
        return eta_ms
    step_ms = max(60_000, int(precision_m / ETA_REFERENCE_SPEED_MPS * 1000))
    return from_ms + -(-(eta_ms - from_ms) // step_ms) * step_ms


def slack_m(precision_m: float) -> float:
    """How far a coarse position may lie from the fix it stands for, at most."""
    return SLACK * precision_m


def nearest(
    found: FixBatch,
    center_lat: float,
    center_lon: float,
    radius_m: float,
    limit: int,
    precision_m: float,
) -> tuple[FixBatch, np.ndarray]:
    """Coarse positions within ``radius_m`` of a point, nearest first, and their
    distances; ``found`` must hold every fix within ``radius_m + slack_m``.

    Distance and order come from the cell centres only (devices in one cell tie and
    go by device id), so a small radius or the order of the answer tells nothing
    finer than the grid."""
    coarse = coarsen(found, precision_m)
    distance = haversine_m(coarse.lat, coarse.lon, center_lat, center_lon)
    inside = np.flatnonzero(distance <= radius_m)
    order = np.lexsort((coarse.device[inside].astype(str), distance[inside]))
    rows = inside[order][:limit]
    return coarse.take(rows), distance[rows]


def widen_box(
    box: tuple[float, float, float, float], by_m: float
) -> tuple[float, float, float, float]:
    """A box (south, west, north, east) grown by ``by_m`` on every side; a box
    that would wrap the whole way round spans every longitude."""
    south, west, north, east = box
    grow_lat = by_m / METRES_PER_DEGREE
    south, north = max(south - grow_lat, -90.0), min(north + grow_lat, 90.0)
    polar = max(abs(south), abs(north))
    if polar >= 89.9:
        return south, -180.0, north, 180.0
    grow_lon = grow_lat / math.cos(math.radians(polar))
    span = east - west if west <= east else east - west + 360.0
    if span + 2 * grow_lon >= 360.0:
        return south, -180.0, north, 180.0
    west = (west - grow_lon + 180.0) % 360.0 - 180.0
    east = (east + grow_lon + 180.0) % 360.0 - 180.0
    return south, west, north, east
