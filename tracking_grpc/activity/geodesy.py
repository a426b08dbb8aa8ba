"""Distances and bearings on the WGS84 ellipsoid, and a local metric frame.

>>> round(float(distance_m(np.array([0.0]), np.array([0.0]),
...                        np.array([0.0]), np.array([1.0]))[0]))
111319
"""

from __future__ import annotations

import numpy as np
from pyproj import Geod

from tracking_grpc.activity.groups import Groups

WGS84 = Geod(ellps="WGS84")
EARTH_RADIUS_M = 6_371_008.8


def distance_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Geodesic distance between point pairs, in metres."""
    if np.size(lat1) == 0:
        return np.zeros(0)
    _, _, dist = WGS84.inv(lon1, lat1, lon2, lat2)
    return np.asarray(dist, dtype=np.float64)


def azimuth_deg(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Initial bearing from the first point to the second, clockwise from north."""
    if np.size(lat1) == 0:
        return np.zeros(0)
    azimuth, _, _ = WGS84.inv(lon1, lat1, lon2, lat2)
    return np.mod(np.asarray(azimuth, dtype=np.float64), 360.0)


def local_xy(
    lat: np.ndarray, lon: np.ndarray, groups: Groups
) -> tuple[np.ndarray, np.ndarray]:
    """East and north metres from each group's first fix (equirectangular).

    Good to a fraction of a percent over a few kilometres, which is all the stop
    detector compares; longitudes are unwrapped across the antimeridian.
    """
    if lat.shape[0] == 0:
        return np.zeros(0), np.zeros(0)
    start = groups.row_start()
    lat0 = lat[start]
    dlon = (lon - lon[start] + 180.0) % 360.0 - 180.0
    scale = np.deg2rad(1.0) * EARTH_RADIUS_M
    x = dlon * scale * np.cos(np.deg2rad(lat0))
    y = (lat - lat0) * scale
    return x, y
