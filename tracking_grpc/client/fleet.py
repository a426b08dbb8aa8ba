"""Synthetic vehicles for demos and load: straight street segments on a grid.

Each vehicle drives along a street at its own cruising speed (accelerating and
braking within car limits), turns left, right or goes straight at the end of a
segment, sometimes waits at a junction, and heads back towards the centre when it
leaves the area. Reported fixes carry GPS noise matching their accuracy. All
vehicles advance in one vectorised step (pyproj geodesics on arrays).

>>> fleet = SyntheticFleet(3, centre=(60.1699, 24.9384), radius_m=1500, seed=1)
>>> len(fleet.step(1.0).lat)
3
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pyproj import Geod

GEOD = Geod(ellps="WGS84")
ACCEL_MPS2 = 2.0
BRAKE_MPS2 = 3.5
TURN_CHOICES_DEG = np.array([-90.0, 0.0, 90.0])
TURN_WEIGHTS = np.array([0.3, 0.4, 0.3])


@dataclass(frozen=True, slots=True)
class FleetFixes:
    """Reported fixes of every vehicle at one instant (arrays of length n)."""

    lat: np.ndarray
    lon: np.ndarray
    speed_mps: np.ndarray
    heading_deg: np.ndarray
    accuracy_m: np.ndarray


class SyntheticFleet:
    """``n`` vehicles driving around ``centre`` (lat, lon) within about ``radius_m``."""

    def __init__(
        self,
        n: int,
        centre: tuple[float, float],
        radius_m: float = 2000.0,
        seed: int | None = None,
    ) -> None:
        self.n = n
        self.radius_m = radius_m
        self._rng = np.random.default_rng(seed)
        self._centre_lat = np.full(n, centre[0])
        self._centre_lon = np.full(n, centre[1])
        self._grid_deg = float(self._rng.uniform(0.0, 90.0))

        distance = radius_m * 0.7 * np.sqrt(self._rng.uniform(size=n))
        azimuth = self._rng.uniform(0.0, 360.0, size=n)
        self.lon, self.lat, _ = GEOD.fwd(
            self._centre_lon, self._centre_lat, azimuth, distance
        )
        self.heading_deg = self._grid_deg + 90.0 * self._rng.integers(0, 4, size=n)
        self.speed_mps = np.zeros(n)
        self._cruise_mps = self._rng.uniform(6.0, 16.0, size=n)
        self._segment_left_m = self._rng.uniform(50.0, 600.0, size=n)
        self._wait_left_s = np.zeros(n)

    def step(self, dt_s: float) -> FleetFixes:
        """Advance every vehicle by ``dt_s`` seconds and report noisy fixes."""
        waiting = self._wait_left_s > 0
        self._wait_left_s = np.maximum(self._wait_left_s - dt_s, 0.0)
        target = np.where(waiting, 0.0, self._cruise_mps)
        change = np.clip(target - self.speed_mps, -BRAKE_MPS2 * dt_s, ACCEL_MPS2 * dt_s)
        self.speed_mps = np.maximum(self.speed_mps + change, 0.0)

        moved_m = np.minimum(self.speed_mps * dt_s, self._segment_left_m)
        self.lon, self.lat, _ = GEOD.fwd(self.lon, self.lat, self.heading_deg, moved_m)
        self._segment_left_m -= moved_m
        self._new_segments(self._segment_left_m <= 0.0)
        return self._report()

    def _new_segments(self, ended: np.ndarray) -> None:
        k = int(ended.sum())
        if k == 0:
            return
        turn = self._rng.choice(TURN_CHOICES_DEG, size=k, p=TURN_WEIGHTS)
        heading = self.heading_deg[ended] + turn

        _, back_azimuth, distance = GEOD.inv(
            self._centre_lon[ended], self._centre_lat[ended],
            self.lon[ended], self.lat[ended],
        )  # fmt: skip
        outside = distance > self.radius_m
        homeward = self._grid_deg + 90.0 * np.round(
            (back_azimuth - self._grid_deg) / 90
        )
        heading = np.where(outside, homeward, heading)

        self.heading_deg[ended] = np.mod(heading, 360.0)
        self._segment_left_m[ended] = self._rng.uniform(80.0, 600.0, size=k)
        self._cruise_mps[ended] = self._rng.uniform(6.0, 16.0, size=k)
        stops = self._rng.uniform(size=k) < 0.3
        self._wait_left_s[ended] = np.where(
            stops, self._rng.uniform(5, 40, size=k), 0.0
        )

    def _report(self) -> FleetFixes:
        accuracy_m = self._rng.uniform(3.0, 12.0, size=self.n)
        error_m = np.abs(self._rng.normal(0.0, accuracy_m / 2.0))
        azimuth = self._rng.uniform(0.0, 360.0, size=self.n)
        lon, lat, _ = GEOD.fwd(self.lon, self.lat, azimuth, error_m)
        return FleetFixes(
            lat=lat,
            lon=lon,
            speed_mps=self.speed_mps.copy(),
            heading_deg=self.heading_deg.copy(),
            accuracy_m=accuracy_m,
        )
