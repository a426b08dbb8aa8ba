"""Stop-order optimisation on Helsinki tables: feasible, and better than naive."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tracking_grpc.routing import optimise

DEPOT = (60.1702, 24.9401)


def random_jobs(car, n: int, seed: int, **extra) -> list[optimise.JobSpec]:
    """Jobs at random places that the car network reaches both ways from the depot."""
    rng = np.random.default_rng(seed)
    lat = rng.uniform(60.166, 60.177, 4 * n)
    lon = rng.uniform(24.936, 24.952, 4 * n)
    table = car.table(np.r_[DEPOT[0], lat], np.r_[DEPOT[1], lon])
    reachable = np.isfinite(table.duration_s[0, 1:]) & np.isfinite(
        table.duration_s[1:, 0]
    )
    chosen = np.flatnonzero(reachable)[:n]
    return [
        optimise.JobSpec(f"j{k}", (float(lat[i]), float(lon[i])), **extra)
        for k, i in enumerate(chosen)
    ]


def tour_s(problem: optimise.Problem, order: list[int]) -> float:
    depot = problem.vehicle_places[0][0]
    places = [depot, *(problem.job_places[j] for j in order), depot]
    return float(sum(problem.duration_s[a, b] for a, b in itertools.pairwise(places)))


def nearest_neighbour(problem: optimise.Problem) -> list[int]:
    left, here, order = set(range(len(problem.jobs))), problem.vehicle_places[0][0], []
    while left:
        nxt = min(left, key=lambda j: problem.duration_s[here, problem.job_places[j]])
        order.append(nxt)
        left.remove(nxt)
        here = problem.job_places[nxt]
    return order


def test_single_vehicle_tour_beats_input_and_nearest_neighbour_orders(car) -> None:
    jobs = random_jobs(car, 25, seed=3)
    van = optimise.VehicleSpec("van", DEPOT, DEPOT)
    problem = optimise.build_problem(car, [van], jobs)
    plan = optimise.solve(problem)
    index = {j.job_id: i for i, j in enumerate(jobs)}
    order = [index[s.job_id] for s in plan.vehicles[0].stops if s.kind == "job"]
    assert sorted(order) == list(range(len(jobs))) and not plan.unassigned
    assert tour_s(problem, order) <= tour_s(problem, nearest_neighbour(problem))
    assert tour_s(problem, order) < tour_s(problem, list(range(len(jobs))))
    assert plan.vehicles[0].duration_s == pytest.approx(
        tour_s(problem, order), abs=len(jobs)
    )


def test_plan_respects_time_windows_capacities_and_shifts(car) -> None:
    jobs = random_jobs(car, 40, seed=5, service_s=120, demand=(2,))
    jobs = [
        optimise.JobSpec(
            j.job_id, j.location, 120, ((k % 4 * 900, k % 4 * 900 + 1800),), (2,)
        )
        for k, j in enumerate(jobs)
    ]
    fleet = [
        optimise.VehicleSpec(f"v{i}", DEPOT, DEPOT, (20,), (0, 7200)) for i in range(3)
    ]
    plan = optimise.solve(optimise.build_problem(car, fleet, jobs))
    by_id = {j.job_id: j for j in jobs}
    for vehicle in plan.vehicles:
        stops = [s for s in vehicle.stops if s.kind == "job"]
        assert 2 * len(stops) <= 20
        assert all(0 <= s.load[0] <= 20 for s in vehicle.stops)
        for s in stops:
            start = s.arrival_s + s.waiting_s
            assert any(a <= start <= b for a, b in by_id[s.job_id].windows_s)
        assert vehicle.stops[-1].arrival_s <= 7200
    assigned = sum(len(v.stops) - 2 for v in plan.vehicles)
    assert assigned + len(plan.unassigned) == len(jobs)
    assert all(
        r == "the fleet's capacity or shift time went to other jobs"
        for r in plan.unassigned.values()
    )


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        pytest.param(
            optimise.JobSpec("crane", DEPOT, skills=frozenset({"crane"})),
            "skills crane",
            id="skills",
        ),
        pytest.param(
            optimise.JobSpec("piano", DEPOT, demand=(50,)),
            "exceeds the capacity",
            id="demand",
        ),
        pytest.param(
            optimise.JobSpec("late", DEPOT, windows_s=((90_000, 90_100),)),
            "time",
            id="window",
        ),
    ],
)
def test_unassigned_jobs_say_why(car, job, reason) -> None:
    van = optimise.VehicleSpec("van", DEPOT, DEPOT, (10,), (0, 3600))
    plan = optimise.solve(optimise.build_problem(car, [van], [job]))
    assert reason in plan.unassigned[job.job_id]


def test_identical_stops_give_a_zero_length_plan(car, field_cases) -> None:
    query = next(q for q in field_cases["C24"]["queries"] if q["id"] == "R3")
    here = (
        DEPOT  # the case's point lies outside the extract: the same shape, moved here
    )
    jobs = [optimise.JobSpec(s["id"], here) for s in query["stops"]]
    plan = optimise.solve(
        optimise.build_problem(car, [optimise.VehicleSpec("v", here, here)], jobs)
    )
    assert plan.distance_m == field_cases["C24"]["expected"]["R3"]["total_distance_m"]
    assert sorted(s.job_id for s in plan.vehicles[0].stops if s.kind == "job") == [
        "s1",
        "s2",
    ]


def test_a_place_nothing_reaches_among_many_jobs_is_left_unassigned() -> None:
    """A whole column without roads puts "no route" in every row: the stand-in stays
    within VROOM's cost bound however many jobs there are."""
    n = 600
    rng = np.random.default_rng(7)
    duration_s = rng.uniform(60, 600, (n + 1, n + 1))
    np.fill_diagonal(duration_s, 0)
    duration_s[:, 1] = np.nan
    duration_s[1, 1] = 0
    problem = optimise.Problem(
        vehicles=[optimise.VehicleSpec("van", DEPOT, DEPOT)],
        jobs=[optimise.JobSpec(f"j{k}", DEPOT) for k in range(n)],
        lat=np.full(n + 1, DEPOT[0]),
        lon=np.full(n + 1, DEPOT[1]),
        duration_s=duration_s,
        distance_m=np.nan_to_num(duration_s * 10),
        vehicle_places=[(0, 0)],
        job_places=list(range(1, n + 1)),
    )
    plan = optimise.solve(problem, exploration_level=0, timeout_s=2)
    assert list(plan.unassigned) == ["j0"]
    assert "no road route" in plan.unassigned["j0"]
