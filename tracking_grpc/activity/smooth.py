"""Smoothed positions that weigh each fix by its reported accuracy.

Two estimators of one model (constant velocity disturbed by white acceleration of
density ``accel_var``; a fix is the true position plus noise of standard deviation
``accuracy_m``):

* :class:`KalmanFilter` runs forward as fixes stream in, one step for all devices
  of a batch at a time, and gives each device's smoothed live position.
* :func:`smooth_track` looks at a whole track at once (history queries): the
  positions that best fit fixes and model together, from one sparse solve per axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve

from tracking_grpc.activity.geodesy import EARTH_RADIUS_M

M_PER_DEG = np.deg2rad(1.0) * EARTH_RADIUS_M
ACCEL_VAR = 2.0  # (m/s^2)^2 per second: tuned on the car trace with added noise
RESET_S = 300.0  # after this long without fixes the filter starts afresh
UNKNOWN_ACCURACY_M = 10.0


def _accuracy(accuracy_m: np.ndarray) -> np.ndarray:
    acc = np.asarray(accuracy_m, dtype=np.float64)
    return np.where(np.isfinite(acc) & (acc > 0), acc, UNKNOWN_ACCURACY_M)


@dataclass
class KalmanFilter:
    """Per-slot filter state; a slot is one device of a tenant."""

    size: int = 0
    origin: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    time_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pos: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # m, east/north
    vel: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    p_pp: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    p_pv: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    p_vv: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    def grow(self, size: int) -> None:
        extra = size - self.size
        if extra <= 0:
            return
        pad2 = np.zeros((extra, 2))
        self.origin = np.vstack([self.origin, np.full((extra, 2), np.nan)])
        self.time_ms = np.append(self.time_ms, np.full(extra, -1, np.int64))
        for name in ("pos", "vel", "p_pp", "p_pv", "p_vv"):
            setattr(self, name, np.vstack([getattr(self, name), pad2]))
        self.size = size

    def reset(self, slot: int) -> None:
        """Forget one slot's filter: its next fix starts it afresh."""
        self.origin[slot] = np.nan
        self.time_ms[slot] = -1
        for name in ("pos", "vel", "p_pp", "p_pv", "p_vv"):
            getattr(self, name)[slot] = 0.0

    def step(
        self, slot, time_ms, lat, lon, accuracy_m
    ) -> tuple[np.ndarray, np.ndarray]:
        """One fix for each of several distinct slots; returns smoothed lat, lon."""
        acc = _accuracy(accuracy_m)
        fresh = (self.time_ms[slot] < 0) | (
            (time_ms - self.time_ms[slot]) / 1000.0 > RESET_S
        )
        fresh |= np.isnan(self.origin[slot, 0])
        origin = self.origin[slot]
        origin[fresh] = np.column_stack([lat, lon])[fresh]
        self.origin[slot] = origin
        z = np.column_stack(
            [
                (lon - origin[:, 1]) * M_PER_DEG * np.cos(np.deg2rad(origin[:, 0])),
                (lat - origin[:, 0]) * M_PER_DEG,
            ]
        )
        r = (acc**2)[:, None]
        dt = np.maximum((time_ms - self.time_ms[slot]) / 1000.0, 0.0)[:, None]
        pos, vel = self.pos[slot], self.vel[slot]
        p_pp, p_pv, p_vv = self.p_pp[slot], self.p_pv[slot], self.p_vv[slot]

        q = ACCEL_VAR
        pos = pos + vel * dt
        p_pp = p_pp + 2 * dt * p_pv + dt**2 * p_vv + q * dt**3 / 3
        p_pv = p_pv + dt * p_vv + q * dt**2 / 2
        p_vv = p_vv + q * dt
        s = p_pp + r
        k_p, k_v = p_pp / s, p_pv / s
        innovation = z - pos
        pos = pos + k_p * innovation
        vel = vel + k_v * innovation
        p_vv = p_vv - k_v * p_pv
        p_pv = (1 - k_p) * p_pv
        p_pp = (1 - k_p) * p_pp

        f = fresh[:, None]
        self.pos[slot] = np.where(f, z, pos)
        self.vel[slot] = np.where(f, 0.0, vel)
        self.p_pp[slot] = np.where(f, r, p_pp)
        self.p_pv[slot] = np.where(f, 0.0, p_pv)
        self.p_vv[slot] = np.where(f, 100.0, p_vv)
        self.time_ms[slot] = time_ms
        return self.position(slot)

    def position(self, slot) -> tuple[np.ndarray, np.ndarray]:
        origin = self.origin[slot]
        pos = self.pos[slot]
        lat = origin[:, 0] + pos[:, 1] / M_PER_DEG
        lon = origin[:, 1] + pos[:, 0] / (M_PER_DEG * np.cos(np.deg2rad(origin[:, 0])))
        return lat, (lon + 180.0) % 360.0 - 180.0


def filter_track(
    time_ms, lat, lon, accuracy_m, group_index
) -> tuple[np.ndarray, np.ndarray]:
    """Forward-filtered positions of rows sorted by group, then time.

    One pass per position within the groups, all groups at once.
    """
    n = time_ms.shape[0]
    out_lat, out_lon = np.empty(n), np.empty(n)
    if n == 0:
        return out_lat, out_lon
    kf = KalmanFilter()
    kf.grow(int(group_index.max()) + 1)
    change = np.append(True, group_index[1:] != group_index[:-1])
    starts = np.flatnonzero(change)
    rank = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    order = np.lexsort((group_index, rank))
    bounds = np.searchsorted(rank[order], np.arange(rank.max() + 2))
    for k in range(rank.max() + 1):
        rows = order[bounds[k] : bounds[k + 1]]
        out_lat[rows], out_lon[rows] = kf.step(
            group_index[rows], time_ms[rows], lat[rows], lon[rows], accuracy_m[rows]
        )
    return out_lat, out_lon


def smooth_track(time_ms, lat, lon, accuracy_m) -> tuple[np.ndarray, np.ndarray]:
    """Best positions of one device's whole track (sorted by time), both axes.

    Minimises the accuracy-weighted misfit to the fixes plus the white-acceleration
    penalty of the model; silences longer than 300 s cut the track.
    """
    n = time_ms.shape[0]
    if n < 3:
        return lat.astype(np.float64), lon.astype(np.float64)
    lat0, lon0 = float(lat[0]), float(lon[0])
    east = ((lon - lon0 + 180.0) % 360.0 - 180.0) * M_PER_DEG * np.cos(np.deg2rad(lat0))
    north = (lat - lat0) * M_PER_DEG
    weight = 1.0 / _accuracy(accuracy_m) ** 2

    dt = np.maximum(np.diff(time_ms) / 1000.0, 0.5)
    d1, d2 = dt[:-1], dt[1:]
    mean_dt = (d1 + d2) / 2.0
    linked = (d1 <= RESET_S) & (d2 <= RESET_S)
    scale = np.where(linked, 1.0 / np.sqrt(ACCEL_VAR * mean_dt), 0.0)
    rows = np.arange(n - 2)
    # Change of velocity between consecutive steps, per row of D.
    data = np.concatenate([scale / d1, -scale * (1 / d1 + 1 / d2), scale / d2])
    cols = np.concatenate([rows, rows + 1, rows + 2])
    d = sparse.csr_matrix((data, (np.tile(rows, 3), cols)), shape=(n - 2, n))
    a = (sparse.diags(weight) + d.T @ d).tocsc()
    east_s = spsolve(a, weight * east)
    north_s = spsolve(a, weight * north)
    out_lat = lat0 + north_s / M_PER_DEG
    out_lon = lon0 + east_s / (M_PER_DEG * np.cos(np.deg2rad(lat0)))
    return out_lat, (out_lon + 180.0) % 360.0 - 180.0
