"""Live events and history agree on trips, whatever the batch sizes.

Live, a stop's centre comes from the recent fixes a device keeps (parked ones
thinned to one per 30 s), so on a slow departure the fix where the trip starts
may differ from history's by a fix or two (seen at 2 m/s departures with 3 m of
noise): the tolerance is two fix intervals.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.activity.helpers import stream, track
from tracking_grpc.activity.params import ActivityParams
from tracking_grpc.activity.segments import trips
from tracking_grpc.activity.track import analyse

legs = st.lists(
    st.tuples(st.integers(2, 15), st.floats(2.0, 25.0)),  # minutes parked, m/s
    min_size=1,
    max_size=4,
)


def day(plan, step_s: float, seed: int):
    """Parked, then driving 5 min, for each leg; parked 10 min at the end."""
    rng = np.random.default_rng(seed)
    east = [np.zeros(1)]
    for minutes, speed in plan:
        here = east[-1][-1]
        east.append(np.full(int(minutes * 60 / step_s), here))
        east.append(here + np.arange(1, int(300 / step_s) + 1) * speed * step_s)
    east.append(np.full(int(600 / step_s), east[-1][-1]))
    x = np.concatenate(east)
    return track(x + rng.normal(0, 3, x.size), rng.normal(0, 3, x.size), step_s)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(plan=legs, step_s=st.sampled_from([5.0, 15.0, 30.0]), chunk=st.integers(1, 40))
def test_trip_starts_and_ends_agree(plan, step_s, chunk):
    batch = day(plan, step_s, seed=len(plan))
    params = ActivityParams()
    found = trips(analyse(batch, params, complete=True), params)
    _, events = stream(batch, chunk=chunk)
    started = [e.time_ms for e in events if e.type.name == "TRIP_STARTED"]
    ended = [e.time_ms for e in events if e.type.name == "TRIP_ENDED"]
    tolerance_ms = 2 * step_s * 1000
    assert len(started) == len(ended) == len(found)
    for live_start, live_end, trip in zip(started, ended, found, strict=True):
        assert abs(live_start - trip.start.time_ms) <= tolerance_ms
        assert abs(live_end - trip.end.time_ms) <= tolerance_ms
