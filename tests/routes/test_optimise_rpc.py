"""OptimizeRoute's edges on a real server: places no road leaves, time windows as a
dispatcher writes them, and request fields named in every refusal."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tracking.v1 import common_pb2, route_pb2

from tests.server_fixtures import violation

P = common_pb2.LatLng
W = route_pb2.TimeWindow
DEPOT = P(lat=60.169, lon=24.94)
# Töölönlahdenkatu: the depot's roads reach it, but no road route leaves it.
DEAD_END = P(lat=60.1735, lon=24.938)
NEAR = [
    P(lat=60.1655, lon=24.942),
    P(lat=60.1702, lon=24.9401),
    P(lat=60.1750, lon=24.9502),
    P(lat=60.1690, lon=24.9330),
    P(lat=60.1672, lon=24.9455),
    P(lat=60.1718, lon=24.9460),
    P(lat=60.1665, lon=24.9370),
]
FAR = P(lat=60.175, lon=25.5)  # 30 km east of the extract
NO_ROAD = "no road route joins it to the start and end of any suitable vehicle"
START_MS = 1_760_000_000_000


def van(name: str = "v1", start=DEPOT, end=DEPOT, **extra) -> route_pb2.Vehicle:
    return route_pb2.Vehicle(id=name, start=start, end=end, **extra)


def job(name: str, where: P, **extra) -> route_pb2.Job:
    return route_pb2.Job(id=name, location=where, **extra)


async def optimise(routes, vehicles, jobs) -> route_pb2.OptimizeRouteResponse:
    request = route_pb2.OptimizeRouteRequest(
        vehicles=vehicles, jobs=jobs, departure_ms=START_MS
    )
    return await routes.OptimizeRoute(request)


async def assert_every_leg_has_a_road(routes, answer) -> None:
    for route in answer.routes:
        points = [s.location for s in route.stops]
        matrix = await routes.ComputeMatrix(
            route_pb2.ComputeMatrixRequest(points=points)
        )
        table = np.array(matrix.duration_s).reshape(matrix.rows, matrix.columns)
        legs = [table[k, k + 1] for k in range(len(points) - 1)]
        assert min(legs, default=0) >= 0, (
            f"{route.vehicle_id} drives a leg with no road"
        )
        assert route.duration_s < 3600
        assert route.stops[-1].arrival_ms < START_MS + 3_600_000


@pytest.mark.parametrize(
    "shift",
    [
        pytest.param(None, id="no-shift"),
        pytest.param(W(start_ms=START_MS, end_ms=START_MS + 7_200_000), id="shift"),
    ],
)
async def test_a_job_no_road_leaves_is_unassigned(routes, shift) -> None:
    answer = await optimise(
        routes, [van(shift=shift)], [job("eli", DEAD_END), job("ok", NEAR[0])]
    )
    assert [(u.job_id, u.reason) for u in answer.unassigned] == [("eli", NO_ROAD)]
    assert [s.job_id for s in answer.routes[0].stops if s.job_id] == ["ok"]
    await assert_every_leg_has_a_road(routes, answer)


async def test_two_vehicles_and_eight_jobs_leave_only_the_dead_end(routes) -> None:
    jobs = [job("eli", DEAD_END)] + [job(f"j{k}", p) for k, p in enumerate(NEAR)]
    answer = await optimise(routes, [van("v1"), van("v2")], jobs)
    assert [(u.job_id, u.reason) for u in answer.unassigned] == [("eli", NO_ROAD)]
    assert sum(len(r.stops) - 2 for r in answer.routes) == len(NEAR)
    await assert_every_leg_has_a_road(routes, answer)


@pytest.mark.parametrize(
    "stranded",
    [
        pytest.param(van(start=DEAD_END), id="start"),
        pytest.param(van(start=DEAD_END, end=DEAD_END), id="start-and-end"),
    ],
)
async def test_a_vehicle_starting_where_no_road_leaves_plans_nothing(
    routes, stranded
) -> None:
    jobs = [job("a", NEAR[0]), job("b", NEAR[1])]
    answer = await optimise(routes, [stranded], jobs)
    assert not answer.routes
    assert {(u.job_id, u.reason) for u in answer.unassigned} == {
        ("a", NO_ROAD),
        ("b", NO_ROAD),
    }


async def test_a_stranded_vehicle_leaves_its_jobs_to_the_others(routes) -> None:
    jobs = [job(f"j{k}", p) for k, p in enumerate(NEAR)]
    answer = await optimise(routes, [van("stuck", start=DEAD_END), van("v2")], jobs)
    assert [r.vehicle_id for r in answer.routes] == ["v2"] and not answer.unassigned
    await assert_every_leg_has_a_road(routes, answer)


async def test_a_window_never_forces_a_leg_out_of_a_dead_end(routes) -> None:
    """Without an end, the dead end may be a last stop, but not a first one."""
    first = W(start_ms=START_MS, end_ms=START_MS + 400_000)
    jobs = [job("eli", DEAD_END, time_windows=[first]), job("ok", NEAR[0])]
    answer = await optimise(routes, [van(end=None)], jobs)
    assert [s.job_id for s in answer.routes[0].stops if s.job_id] == ["eli"]
    assert [u.job_id for u in answer.unassigned] == ["ok"]
    await assert_every_leg_has_a_road(routes, answer)


def windows(*minutes: tuple[int, int]) -> list[route_pb2.TimeWindow]:
    return [
        W(start_ms=START_MS + a * 60_000, end_ms=START_MS + b * 60_000)
        for a, b in minutes
    ]


@pytest.mark.parametrize(
    "given",
    [
        pytest.param(windows((30, 40), (10, 20)), id="unsorted"),
        pytest.param(windows((10, 30), (20, 40)), id="overlapping"),
        pytest.param(windows((10, 20), (20, 30)), id="touching"),
        pytest.param(windows((10, 20), (10, 20)), id="duplicate"),
        pytest.param(windows((10, 40), (15, 20), (50, 60)), id="nested"),
    ],
)
async def test_job_windows_are_sorted_and_merged(routes, given) -> None:
    answer = await optimise(routes, [van()], [job("a", NEAR[2], time_windows=given)])
    stop = next(s for s in answer.routes[0].stops if s.job_id == "a")
    begins = stop.arrival_ms + stop.waiting_s * 1000
    assert any(w.start_ms <= begins <= w.end_ms for w in given)


@pytest.mark.parametrize(
    "shift",
    [
        pytest.param(W(), id="empty"),
        pytest.param(W(start_ms=START_MS), id="start-only"),
        pytest.param(W(end_ms=START_MS + 3_600_000), id="end-only"),
    ],
)
async def test_a_shift_without_start_or_end_is_open_there(routes, shift) -> None:
    answer = await optimise(routes, [van(shift=shift)], [job("a", NEAR[2])])
    assert not answer.unassigned
    assert answer.routes[0].stops[0].arrival_ms == START_MS


@pytest.mark.parametrize(
    ("vehicles", "jobs", "field"),
    [
        pytest.param(
            [van()],
            [job("a", NEAR[0]), job("b", NEAR[0]), job("c", FAR)],
            "jobs[2].location",
            id="job-after-a-repeated-place",
        ),
        pytest.param(
            [van(start=FAR)], [job("a", NEAR[0])], "vehicles[0].start", id="start"
        ),
        pytest.param(
            [van(), van("v2", end=FAR)],
            [job("a", NEAR[0])],
            "vehicles[1].end",
            id="end",
        ),
        pytest.param(
            [van(start=FAR, end=FAR)],
            [job("a", FAR)],
            "vehicles[0].start",
            id="one-place",
        ),
    ],
)
async def test_a_place_far_from_roads_is_named_as_sent(
    routes, vehicles, jobs, field
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await optimise(routes, vehicles, jobs)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found, description = violation(caught.value)
    assert found == field and "m from the nearest road" in description


@pytest.mark.parametrize(
    ("vehicle", "job_", "field"),
    [
        pytest.param(
            van("v" * 10_000), job("a", NEAR[0]), "vehicles[0].id", id="long-vehicle"
        ),
        pytest.param(van(), job("a\nb", NEAR[0]), "jobs[0].id", id="control-job"),
        pytest.param(van(), job(" ", NEAR[0]), "jobs[0].id", id="blank-job"),
        pytest.param(
            van(), job("a", NEAR[0], skills=[""]), "jobs[0].skills[0]", id="empty-skill"
        ),
        pytest.param(
            van(skills=["x", "\0"]),
            job("a", NEAR[0]),
            "vehicles[0].skills[1]",
            id="nul-skill",
        ),
    ],
)
async def test_ids_and_skills_follow_the_device_id_rules(
    routes, vehicle, job_, field
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await optimise(routes, [vehicle], [job_])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(caught.value)[0] == field


@pytest.mark.parametrize(
    ("vehicles", "jobs", "field", "reason"),
    [
        pytest.param(
            [van(capacity=[2])],
            [job("a", NEAR[0], demand=[1, 1])],
            "jobs[0].demand",
            "has 2 values, expected 1 as vehicles[0].capacity has",
            id="job",
        ),
        pytest.param(
            [van("v1", capacity=[4]), van("v2", capacity=[4, 4])],
            [job("a", NEAR[0], demand=[1]), job("b", NEAR[1])],
            "vehicles[1].capacity",
            "has 2 values, expected 1 as vehicles[0].capacity has",
            id="vehicle",
        ),
        pytest.param(
            [van(), van("v2", capacity=[3, 3])],
            [job("a", NEAR[0]), job("b", NEAR[1], demand=[1, 1, 1])],
            "jobs[1].demand",
            "has 3 values, expected 2 as vehicles[1].capacity has",
            id="unset-ones-aside",
        ),
    ],
)
async def test_a_capacity_or_demand_of_another_size_is_named(
    routes, vehicles, jobs, field, reason
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await optimise(routes, vehicles, jobs)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found, description = violation(caught.value)
    assert (found, description.split(" (")[0]) == (field, reason)
