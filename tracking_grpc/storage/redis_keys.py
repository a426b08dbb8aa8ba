"""Where live state lives in Redis: key names, device buckets and coarse cells.

Keys carry a hash tag (the part in braces) so that what one Lua script touches sits
in one cluster slot, and what grows with the fleet spreads over many slots:

    <prefix>live:{<tenant>:b<bucket>}      hash device -> packed newest fix
    <prefix>livet:{<tenant>:b<bucket>}     hash device -> "<time_ms> <cell>"
    <prefix>geo:{<tenant>:c<cell>}         GEO set of the devices in one cell
    <prefix>geot:{<tenant>:c<cell>}        hash device -> time_ms of its last move
    <prefix>cells:{<tenant>}               set of the cells the tenant has used

``<tenant>`` is the tenant with ``%``, ``{`` and ``}`` percent-encoded (:func:`tag`):
no brace ends the hash tag early, and no two tenants share a key.

A device's bucket is a stable hash of its id; a cell is a ``CELL_DEG`` square of
latitude and longitude, so a cluster node holds some regions, not the whole world.

>>> int(cell_of(np.array([40.7]), np.array([-74.0]))[0])
46906
"""

from __future__ import annotations

import math

import numpy as np

BUCKETS = 64
CELL_DEG = 1.0
ROWS = int(180 / CELL_DEG)
COLS = int(360 / CELL_DEG)
EARTH_RADIUS_M = 6_371_008.8
GEO_MAX_LAT = 85.05112878  # Redis GEO cannot index beyond this latitude

MIX = np.uint64(0x9E3779B97F4A7C15)


TAG_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})


def tag(tenant: str) -> str:
    """The tenant as it may appear inside a hash tag: no braces, and one tenant
    per tag (percent-encoding can be undone, so tenants never share keys).

    >>> tag("acme"), tag("{acme}"), tag("(acme)"), tag("a%7Bb")
    ('acme', '%7Bacme%7D', '(acme)', 'a%257Bb')
    """
    return tenant.translate(TAG_ESCAPES)


def live_key(prefix: str, tenant: str, bucket: int) -> str:
    return f"{prefix}live:{{{tag(tenant)}:b{bucket}}}"


def live_time_key(prefix: str, tenant: str, bucket: int) -> str:
    return f"{prefix}livet:{{{tag(tenant)}:b{bucket}}}"


def geo_key(prefix: str, tenant: str, cell: int) -> str:
    return f"{prefix}geo:{{{tag(tenant)}:c{cell}}}"


def geo_time_key(prefix: str, tenant: str, cell: int) -> str:
    return f"{prefix}geot:{{{tag(tenant)}:c{cell}}}"


def cells_key(prefix: str, tenant: str) -> str:
    return f"{prefix}cells:{{{tag(tenant)}}}"


def bucket_of(devices: np.ndarray, buckets: int = BUCKETS) -> np.ndarray:
    """A stable bucket per device id, the same in every process (not ``hash()``)."""
    text = np.asarray(devices).astype(str)
    if text.size == 0:
        return np.empty(0, dtype=np.int64)
    codes = text.view(np.uint32).reshape(len(text), -1).astype(np.uint64)
    weights = np.cumprod(np.full(codes.shape[1], MIX, dtype=np.uint64))
    with np.errstate(over="ignore"):
        h = (codes * weights).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(31)
        h *= MIX
        h ^= h >> np.uint64(29)
    return (h % np.uint64(buckets)).astype(np.int64)


def cell_of(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """The coarse cell of each position."""
    row = np.clip(np.floor((np.asarray(lat) + 90.0) / CELL_DEG), 0, ROWS - 1)
    col = np.floor((np.asarray(lon) + 180.0) / CELL_DEG) % COLS
    return (row * COLS + col).astype(np.int64)


def cells_for_circle(lat: float, lon: float, radius_m: float) -> np.ndarray:
    """Every cell a circle may touch (a superset; exact distances filter later)."""
    dlat = math.degrees(radius_m / EARTH_RADIUS_M)
    low, high = lat - dlat, lat + dlat
    rows = np.arange(
        int(np.clip(math.floor((low + 90) / CELL_DEG), 0, ROWS - 1)),
        int(np.clip(math.floor((high + 90) / CELL_DEG), 0, ROWS - 1)) + 1,
    )
    widest = max(abs(low), abs(high))
    if high >= 90 or low <= -90 or widest >= 89.9:
        cols = np.arange(COLS)
    else:
        ratio = math.sin(radius_m / EARTH_RADIUS_M) / math.cos(math.radians(widest))
        if ratio >= 1:
            cols = np.arange(COLS)
        else:
            dlon = math.degrees(math.asin(ratio))
            first = math.floor((lon - dlon + 180) / CELL_DEG)
            last = math.floor((lon + dlon + 180) / CELL_DEG)
            cols = np.unique(np.arange(first, last + 1) % COLS)
    return (rows[:, None] * COLS + cols[None, :]).ravel()


def is_polar(cells: np.ndarray) -> np.ndarray:
    """Cells reaching beyond the latitudes Redis GEO can index."""
    row = np.asarray(cells) // COLS
    south = row * CELL_DEG - 90.0
    return (south < -GEO_MAX_LAT) | (south + CELL_DEG > GEO_MAX_LAT)


def distance_m(
    lat: float, lon: float, lats: np.ndarray, lons: np.ndarray
) -> np.ndarray:
    """Great-circle (haversine) distances from one point to many, in metres."""
    phi1, phi2 = math.radians(lat), np.radians(lats)
    dphi = phi2 - phi1
    dlmb = np.radians(lons) - math.radians(lon)
    a = np.sin(dphi / 2) ** 2 + math.cos(phi1) * np.cos(phi2) * np.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
