"""A speed the device reports is taken where the track makes it plausible."""

from __future__ import annotations

import numpy as np

from tests.activity.helpers import track
from tracking_grpc.activity import views
from tracking_grpc.activity.params import ActivityParams
from tracking_grpc.activity.segments import trips
from tracking_grpc.activity.track import analyse

PARAMS = ActivityParams()


def driving(reported_mps: float) -> np.ndarray:
    """A device driving east at 10 m/s for five minutes, one fix a second, whose
    fix 100 reports ``reported_mps`` (the others report 10 m/s)."""
    n = 300
    speeds = np.full(n, 10.0)
    speeds[100] = reported_mps
    return track(np.arange(n) * 10.0, np.zeros(n), speed_mps=speeds)


def test_a_reported_speed_above_max_speed_is_replaced_by_the_steps():
    """A glitching receiver's 500 m/s on a 10 m/s track: the cleaned track and
    the trip's top speed show the step's own speed, not the glitch."""
    a = analyse(driving(500.0), PARAMS, complete=True)
    cleaned = views.clean(a)
    assert abs(float(np.nanmax(cleaned.speed_mps)) - 10.0) < 0.1
    (trip,) = trips(a, PARAMS)
    assert abs(trip.max_speed_mps - 10.0) < 0.1


def test_a_plausible_reported_speed_is_kept():
    """Below max_speed_mps the device's own (Doppler) speed stands."""
    a = analyse(driving(12.5), PARAMS, complete=True)
    (trip,) = trips(a, PARAMS)
    assert trip.max_speed_mps == 12.5
