"""Distances and areas on the sphere, on arrays.

Great-circle distances use the haversine formula on a sphere of the mean Earth radius,
which is within 0.5 % of the ellipsoid everywhere and exact enough for live queries;
fence geometry that needs the ellipsoid uses pyproj (see the geofence package).

>>> round(float(haversine_m(0.0, 0.0, 0.0, 1.0)), 1)
111195.1
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

EARTH_RADIUS_M = 6_371_008.8


def haversine_m(
    lat1: ArrayLike, lon1: ArrayLike, lat2: ArrayLike, lon2: ArrayLike
) -> np.ndarray:
    """Great-circle distance in metres between points given in degrees (broadcasts)."""
    phi1 = np.radians(lat1)
    phi2 = np.radians(lat2)
    dphi = phi2 - phi1
    dlmb = np.radians(
        np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64)
    )
    h = np.sin(dphi / 2) ** 2 + np.cos(phi1) * np.cos(phi2) * np.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def path_length_m(lat: ArrayLike, lon: ArrayLike) -> float:
    """Length of the polyline through the points, in order, in metres."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if lat.shape[0] < 2:
        return 0.0
    return float(haversine_m(lat[:-1], lon[:-1], lat[1:], lon[1:]).sum())


def in_box(
    lat: ArrayLike, lon: ArrayLike, south: float, west: float, north: float, east: float
) -> np.ndarray:
    """Mask of points inside a box; west > east: the box crosses the antimeridian."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    rows = (lat >= south) & (lat <= north)
    if west <= east:
        return rows & (lon >= west) & (lon <= east)
    return rows & ((lon >= west) | (lon <= east))


def in_circle(
    lat: ArrayLike,
    lon: ArrayLike,
    center_lat: float,
    center_lon: float,
    radius_m: float,
) -> np.ndarray:
    """Mask of points within radius_m of the centre (great-circle distance)."""
    return haversine_m(lat, lon, center_lat, center_lon) <= radius_m
