"""Real taxi trips in central Porto: map matching, ETAs before and after learning."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tracking.v1 import route_pb2_grpc

from tests.conftest import TRACES, require_shared
from tests.routes import porto


@pytest.fixture(scope="module")
def trips() -> list[porto.Trip]:
    return porto.trips_inside(require_shared(TRACES / "porto_taxi_test320.csv"))


async def porto_stub(start_server, porto_dir):
    server = await start_server(routing_data_dir=str(porto_dir))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return channel, route_pb2_grpc.RouteStub(channel)


async def test_taxi_trips_match_to_the_roads(start_server, porto_dir, trips) -> None:
    channel, stub = await porto_stub(start_server, porto_dir)
    async with channel:
        matched = [await porto.match(stub, trip) for trip in trips]
    assert len(trips) >= 40
    assert all(m.pieces >= 1 for m in matched)
    assert np.mean([m.share for m in matched]) > 0.95
    assert np.median([m.confidence for m in matched]) > 0.5


async def test_learning_from_trips_improves_their_etas(
    start_server, porto_dir, trips
) -> None:
    """Two-fold: ETAs of one half of the trips after learning from the other half."""
    actual, before, after = [], [], []
    for fold in (0, 1):
        channel, stub = await porto_stub(start_server, porto_dir)
        async with channel:
            matched = porto.timed([await porto.match(stub, trip) for trip in trips])
            await porto.learn(stub, matched[fold::2])
            for trip in matched[1 - fold :: 2]:
                engine_s, learned_s = await porto.eta_s(stub, trip)
                actual.append(trip.duration_s)
                before.append(engine_s)
                after.append(learned_s)
    errors = porto.eta_errors(np.array(actual), np.array(before), np.array(after))
    assert len(actual) >= 30
    assert errors["after"]["mean_abs_s"] < 0.9 * errors["before"]["mean_abs_s"]
    assert errors["after"]["median_abs_s"] < errors["before"]["median_abs_s"]
    assert abs(errors["after"]["median_ratio"] - 1) < abs(
        errors["before"]["median_ratio"] - 1
    )
