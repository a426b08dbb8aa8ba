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
    # Each vertex carries its fix's index as z, which simplification keeps and
    # ignores: a kept fix is known by its index, never by its coordinates (a
    # device back at a spot, or jittering between two readings, matches by value).
    index = np.arange(len(fixes), dtype=np.float64)
    line = shapely.simplify(
        shapely.linestrings(x, y, index), tolerance_m, preserve_topology=False
    )
    kept = shapely.get_coordinates(line, include_z=True)[:, 2].astype(np.int64)
    keep = np.zeros(len(fixes), dtype=bool)
    keep[_run_starts(x, y)[kept]] = True
    keep[[0, -1]] = True
    return fixes.take(keep)


def _run_starts(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """For every fix, the first fix of its run at one spot (a parked device): the
    one simplification keeps of the run."""
    moved = np.ones(len(x), dtype=bool)
    moved[1:] = (x[1:] != x[:-1]) | (y[1:] != y[:-1])
    return np.maximum.accumulate(np.where(moved, np.arange(len(x)), 0))
