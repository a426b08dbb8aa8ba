"""Track views for history queries: clean or smoothed positions, simplification
and clipping to an area.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import shapely

from tracking_grpc.activity.clean import derive_headings
from tracking_grpc.activity.geodesy import local_xy
from tracking_grpc.activity.groups import Groups
from tracking_grpc.activity.smooth import smooth_track
from tracking_grpc.activity.track import Analysis
from tracking_grpc.core.fixes import FixBatch


def clean(a: Analysis) -> FixBatch:
    """Trusted fixes, with speed and heading derived where the device sent none."""
    f = a.fixes
    heading = derive_headings(f.lat, f.lon, f.heading_deg, a.steps)
    filled = replace(
        f,
        speed_mps=a.steps.speed_mps.astype(np.float32),
        heading_deg=heading.astype(np.float32),
    )
    return filled.take(a.trusted)


def smoothed(a: Analysis) -> FixBatch:
    """Trusted fixes at their smoothed positions (one device)."""
    fixes = clean(a)
    lat, lon = smooth_track(fixes.time_ms, fixes.lat, fixes.lon, fixes.accuracy_m)
    return replace(fixes, lat=lat, lon=lon)


def simplify(fixes: FixBatch, tolerance_m: float) -> FixBatch:
    """Fixes of one device kept by Douglas-Peucker at tolerance_m (ends always kept)."""
    if tolerance_m <= 0 or len(fixes) < 3:
        return fixes
    x, y = local_xy(
        fixes.lat, fixes.lon, Groups.of(np.zeros(len(fixes), dtype=np.int8))
    )
    line = shapely.linestrings(x, y)
    kept = shapely.get_coordinates(
        shapely.simplify(line, tolerance_m, preserve_topology=False)
    )
    # Simplification keeps input vertices unchanged, so they are found by value;
    # of a run of fixes at one spot (a parked device) the first one is kept.
    keep = np.isin(x, kept[:, 0]) & np.isin(y, kept[:, 1])
    repeat = np.zeros(len(fixes), dtype=bool)
    repeat[1:] = (x[1:] == x[:-1]) & (y[1:] == y[:-1])
    keep &= ~repeat
    keep[[0, -1]] = True
    return fixes.take(keep)
