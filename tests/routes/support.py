"""Simulated drives along computed routes, for the route tests and the benchmark."""

from __future__ import annotations

import numpy as np
import shapely

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.routing.geometry import EARTH_RADIUS_M, segment_lengths_m, to_local

START_MS = 1_760_000_000_000
METRES_PER_DEGREE = np.radians(1.0) * EARTH_RADIUS_M


def along_route(lat: np.ndarray, lon: np.ndarray, at_m: np.ndarray) -> np.ndarray:
    """(lat, lon) rows of the points ``at_m`` metres along a polyline."""
    cum = np.r_[0.0, np.cumsum(segment_lengths_m(lat, lon))]
    return np.column_stack((np.interp(at_m, cum, lat), np.interp(at_m, cum, lon)))


def route_length_m(lat: np.ndarray, lon: np.ndarray) -> float:
    return float(segment_lengths_m(lat, lon).sum())


def drive(
    lat: np.ndarray,
    lon: np.ndarray,
    speed_mps: float,
    step_s: float = 5.0,
    slow: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fixes every step_s from start to end of a route at speed_mps, or at the
    ``slow`` (from_m, to_m, speed_mps) speed between two places along it.

    Returns the (lat, lon) rows and how far along the route each one is.
    """
    total_m = route_length_m(lat, lon)
    at_m = [0.0]
    while at_m[-1] < total_m:
        here = at_m[-1]
        speed = slow[2] if slow and slow[0] <= here < slow[1] else speed_mps
        at_m.append(min(here + speed * step_s, total_m))
    along = np.array(at_m)
    return along_route(lat, lon, along), along


def shift(
    points: np.ndarray, rows: np.ndarray, east_m: float, north_m: float
) -> np.ndarray:
    """The same points with ``rows`` moved east and north (a detour)."""
    moved = points.copy()
    moved[rows, 0] += north_m / METRES_PER_DEGREE
    cos_lat = np.cos(np.radians(points[rows, 0]))
    moved[rows, 1] += east_m / (METRES_PER_DEGREE * cos_lat)
    return moved


def fixes(
    device: str,
    points: np.ndarray,
    step_s: float = 5.0,
    accuracy_m: float | np.ndarray = 8.0,
    tenant: str = "t1",
    start_ms: int = START_MS,
) -> FixBatch:
    n = len(points)
    return FixBatch.from_columns(
        tenant,
        [device] * n,
        np.arange(1, n + 1),
        start_ms + (np.arange(n) * step_s * 1000).astype(np.int64),
        points[:, 0],
        points[:, 1],
        accuracy_m=np.broadcast_to(accuracy_m, (n,)).copy(),
    )


def jitter(points: np.ndarray, sigma_m: float, seed: int) -> np.ndarray:
    """GPS-like noise: each coordinate moved by a normal error of sigma_m metres."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, sigma_m, points.shape)
    moved = points.copy()
    moved[:, 0] += noise[:, 0] / METRES_PER_DEGREE
    moved[:, 1] += noise[:, 1] / (METRES_PER_DEGREE * np.cos(np.radians(points[:, 0])))
    return moved


def share_near(
    lat: np.ndarray,
    lon: np.ndarray,
    line_lat: np.ndarray,
    line_lon: np.ndarray,
    within_m: float,
) -> float:
    """Share of the points within_m of a polyline (shapely, in a local metric frame)."""
    x, y = to_local(lat, lon, line_lat[0], line_lon[0])
    lx, ly = to_local(line_lat, line_lon, line_lat[0], line_lon[0])
    line = shapely.LineString(np.column_stack((lx, ly)))
    distance = shapely.distance(line, shapely.points(np.column_stack((x, y))))
    return float(np.mean(distance <= within_m))
