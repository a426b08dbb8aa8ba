"""Synthetic vehicles: plausible speeds, street-like headings, staying in the area."""

from __future__ import annotations

import numpy as np
from pyproj import Geod

from tracking_grpc.client.fleet import SyntheticFleet

CENTRE = (60.1699, 24.9384)
GEOD = Geod(ellps="WGS84")


def drive(
    steps: int, n: int = 50, seed: int = 7, dt_s: float = 1.0
) -> tuple[SyntheticFleet, list]:
    fleet = SyntheticFleet(n, CENTRE, radius_m=1500.0, seed=seed)
    return fleet, [fleet.step(dt_s) for _ in range(steps)]


def test_speeds_stay_within_city_limits_and_change_smoothly():
    _, fixes = drive(200)
    speeds = np.array([f.speed_mps for f in fixes])
    assert speeds.min() >= 0.0 and speeds.max() <= 16.0
    assert np.abs(np.diff(speeds, axis=0)).max() <= 3.5 + 1e-9


def test_true_positions_move_no_faster_than_the_speed():
    fleet = SyntheticFleet(20, CENTRE, radius_m=1500.0, seed=3)
    before = (fleet.lon.copy(), fleet.lat.copy())
    fixes = fleet.step(1.0)
    _, _, moved_m = GEOD.inv(*before, fleet.lon, fleet.lat)
    assert np.all(moved_m <= fixes.speed_mps + 1e-6)


def test_headings_follow_one_street_grid():
    fleet, _ = drive(200)
    offsets = np.mod(fleet.heading_deg - fleet.heading_deg[0], 90.0)
    assert np.allclose(np.minimum(offsets, 90.0 - offsets), 0.0, atol=1e-6)


def test_vehicles_stay_near_the_centre_for_an_hour():
    fleet, _ = drive(1200, n=30, dt_s=3.0)
    lat, lon = np.full(fleet.n, CENTRE[0]), np.full(fleet.n, CENTRE[1])
    _, _, distance_m = GEOD.inv(lon, lat, fleet.lon, fleet.lat)
    assert distance_m.max() < 1500.0 + 800.0


def test_same_seed_same_drive():
    _, first = drive(30, n=5, seed=11)
    _, second = drive(30, n=5, seed=11)
    assert np.array_equal(first[-1].lat, second[-1].lat)
