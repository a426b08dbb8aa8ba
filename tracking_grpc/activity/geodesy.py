"""Distances and bearings on the sphere, and a local metric frame, on arrays.

Great-circle distances (the project's :func:`~tracking_grpc.core.geodesy.haversine_m`,
mean Earth radius) are within 0.5 % of the ellipsoid and cheap enough to run over
every fix of a batch; the field cases state their distances the same way.

>>> round(float(distance_m(0.0, 0.0, 0.0, 1.0)))
111195
"""

from __future__ import annotations

import numpy as np

from tracking_grpc.activity.groups import Groups
from tracking_grpc.core.geodesy import EARTH_RADIUS_M, haversine_m

__all__ = ["EARTH_RADIUS_M", "azimuth_deg", "distance_m", "local_xy"]


def distance_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance between point pairs, in metres."""
    return np.asarray(haversine_m(lat1, lon1, lat2, lon2), dtype=np.float64)


def azimuth_deg(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Initial great-circle bearing from the first point to the second, 0-360."""
    phi1, phi2 = np.radians(lat1), np.radians(lat2)
    dlmb = np.radians(np.asarray(lon2, dtype=np.float64) - lon1)
    y = np.sin(dlmb) * np.cos(phi2)
    x = np.cos(phi1) * np.sin(phi2) - np.sin(phi1) * np.cos(phi2) * np.cos(dlmb)
    return np.mod(np.degrees(np.arctan2(y, x)), 360.0)


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
