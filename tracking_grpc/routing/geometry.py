"""Coordinate checks and along-route arithmetic on arrays.

Lengths along a route are geodesic (``pyproj.Geod``). Distances from a fix to a
route use a local flat frame around the route's first point (east/north metres,
equirectangular), which is within 0.1 % of the geodesic distance over a city and keeps
the projection of many fixes onto many segments a handful of numpy operations.

>>> x, y = to_local(np.array([60.001]), np.array([25.0]), 60.0, 25.0)
>>> round(float(y[0]), 1)
111.2
"""

from __future__ import annotations

import numpy as np
from pyproj import Geod

from tracking_grpc.errors import InvalidArgument

EARTH_RADIUS_M = 6_371_008.8
GEOD = Geod(ellps="WGS84")


def check_points(field: str, lat: np.ndarray, lon: np.ndarray) -> None:
    """Raise InvalidArgument naming the first point out of range or not finite."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(lat) & np.isfinite(lon))
        bad |= (np.abs(lat) > 90.0) | (np.abs(lon) > 180.0)
    if bad.any():
        i = int(np.argmax(bad))
        where = field if lat.ndim == 0 else f"{field}[{i}]"
        raise InvalidArgument(
            where,
            f"lat {float(lat.flat[i])!r}, lon {float(lon.flat[i])!r}: latitude must be "
            "finite and in [-90, 90], longitude finite and in [-180, 180] "
            "(are latitude and longitude swapped?)",
        )


def segment_lengths_m(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Geodesic length of each segment of a polyline (n points -> n-1 lengths)."""
    if len(lat) < 2:
        return np.zeros(0)
    _, _, length = GEOD.inv(lon[:-1], lat[:-1], lon[1:], lat[1:])
    return np.asarray(length, dtype=np.float64)


def to_local(
    lat: np.ndarray, lon: np.ndarray, lat0: np.ndarray | float, lon0: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """East and north metres from (lat0, lon0); broadcasts over arrays of origins."""
    scale = np.radians(1.0) * EARTH_RADIUS_M
    x = (np.asarray(lon) - lon0) * scale * np.cos(np.radians(lat0))
    y = (np.asarray(lat) - lat0) * scale
    return x, y


def project_on_segments(
    px: np.ndarray,
    py: np.ndarray,
    ax: np.ndarray,
    ay: np.ndarray,
    bx: np.ndarray,
    by: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from points to segments a-b and the fraction (0..1) of the foot.

    A zero-length segment gives the distance to its point and fraction 0, not NaN.
    """
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    safe = np.where(length2 > 0.0, length2, 1.0)
    t = np.where(length2 > 0.0, ((px - ax) * dx + (py - ay) * dy) / safe, 0.0)
    t = np.clip(t, 0.0, 1.0)
    ex = ax + t * dx - px
    ey = ay + t * dy - py
    return np.hypot(ex, ey), t
