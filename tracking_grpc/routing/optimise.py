"""Which vehicle visits which job, in what order: VROOM on OSRM travel tables.

Times are seconds from the problem's own origin (the servicer converts from and to
epoch milliseconds). VROOM does not say why a job stays unassigned, so
:func:`unassigned_reason` checks the usual causes in order: skills, demand,
reachability within time windows and shifts, and otherwise a fleet already full.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import vroom

from tracking_grpc.errors import InvalidArgument, TrackingError
from tracking_grpc.routing.engine import RoutingEngine

log = logging.getLogger(__name__)

FOREVER_S = 10 * 365 * 86_400
# VROOM refuses a problem whose travel times could add up past 32 bits: the sum, over
# every vehicle start and end and every job, of the longest leg leaving it.
COST_BOUND = 2**32 - 1
UNLIMITED = 2**31 - 1  # also the largest capacity or demand taken (VROOM sums them)
DEFAULT_TIMEOUT_S = 30.0  # the capacity of a vehicle given none


@dataclass(frozen=True, slots=True)
class VehicleSpec:
    vehicle_id: str
    start: tuple[float, float] | None  # (lat, lon)
    end: tuple[float, float] | None
    capacity: tuple[int, ...] = ()
    shift_s: tuple[int, int] = (0, FOREVER_S)
    skills: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class JobSpec:
    job_id: str
    location: tuple[float, float]
    service_s: int = 0
    windows_s: tuple[tuple[int, int], ...] = ()
    demand: tuple[int, ...] = ()
    priority: int = 0
    skills: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Stop:
    kind: str  # start, job, end
    job_id: str
    lat: float
    lon: float
    arrival_s: int
    service_s: int
    waiting_s: int
    distance_m: float  # from the vehicle's start
    load: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class VehiclePlan:
    vehicle_id: str
    stops: list[Stop]
    distance_m: float
    duration_s: int


@dataclass(frozen=True, slots=True)
class Plan:
    vehicles: list[VehiclePlan]
    unassigned: dict[str, str] = field(default_factory=dict)  # job id -> reason

    @property
    def distance_m(self) -> float:
        return sum(v.distance_m for v in self.vehicles)


@dataclass(frozen=True, slots=True)
class Problem:
    """Vehicles, jobs and the travel tables between their places."""

    vehicles: list[VehicleSpec]
    jobs: list[JobSpec]
    lat: np.ndarray  # every distinct place
    lon: np.ndarray
    duration_s: np.ndarray
    distance_m: np.ndarray
    vehicle_places: list[tuple[int | None, int | None]]
    job_places: list[int]


def build_problem(
    engine: RoutingEngine, vehicles: list[VehicleSpec], jobs: list[JobSpec]
) -> Problem:
    """Check the specs and fetch one OSRM table over every place they name.

    A place too far from a road is refused naming the first field that gives it
    (``vehicles[0].start``, ``jobs[2].location``).
    """
    _check(vehicles, jobs)
    places: dict[tuple[float, float], int] = {}
    fields: list[str] = []  # per place, the first field naming it

    def place(point: tuple[float, float], field_name: str) -> int:
        if point not in places:
            places[point] = len(places)
            fields.append(field_name)
        return places[point]

    def place_or_none(point: tuple[float, float] | None, name: str) -> int | None:
        return None if point is None else place(point, name)

    vehicle_places = [
        (
            place_or_none(v.start, f"vehicles[{i}].start"),
            place_or_none(v.end, f"vehicles[{i}].end"),
        )
        for i, v in enumerate(vehicles)
    ]
    job_places = [place(j.location, f"jobs[{i}].location") for i, j in enumerate(jobs)]
    lat = np.array([p[0] for p in places])
    lon = np.array([p[1] for p in places])
    try:
        if len(places) == 1:
            matrix_s = np.zeros((1, 1))
            matrix_m = np.zeros((1, 1))
            engine.route(np.repeat(lat, 2), np.repeat(lon, 2), steps=False)  # snaps
        else:
            table = engine.table(lat, lon)
            matrix_s, matrix_m = table.duration_s, table.distance_m
    except InvalidArgument as exc:
        raise _place_field(exc, fields) from exc
    return Problem(
        vehicles,
        jobs,
        lat,
        lon,
        matrix_s,
        matrix_m,
        vehicle_places,
        job_places,
    )


def _place_field(error: InvalidArgument, fields: list[str]) -> InvalidArgument:
    """The engine's ``points[k]`` or ``waypoints[k]`` as the request field of place k
    (a single place is routed to itself: both its waypoints are place 0)."""
    name, _, index = error.field.partition("[")
    if name not in {"points", "waypoints"} or not index.endswith("]"):
        return error
    k = min(int(index[:-1]), len(fields) - 1)
    return InvalidArgument(fields[k], error.reason)


def effort_for(jobs: int) -> int:
    """VROOM's search effort by problem size: 5 (its most) for up to 100 jobs, less
    above, so that 1,000 jobs take seconds rather than minutes on two cores."""
    if jobs <= 100:
        return 5
    return 2 if jobs <= 300 else 0


def solve(
    problem: Problem,
    exploration_level: int | None = None,
    threads: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Plan:
    """The best plan VROOM finds within ``timeout_s``; unassigned jobs with a reason."""
    if exploration_level is None:
        exploration_level = effort_for(len(problem.jobs))
    dims = _dimensions(problem)
    stranded = np.flatnonzero(~_servable(problem, dims).any(axis=1)).tolist()
    if len(stranded) == len(problem.jobs):
        return _plan(problem, {}, stranded)
    left_out = set(stranded)
    skill_ids = {s: i for i, s in enumerate(_all_skills(problem))}
    unreachable_s = _unreachable_s(problem, len(problem.jobs) - len(stranded))
    durations = np.where(
        np.isfinite(problem.duration_s), np.rint(problem.duration_s), unreachable_s
    ).astype(np.uint32)
    distances = np.where(
        np.isfinite(problem.distance_m), np.rint(problem.distance_m), 0
    ).astype(np.uint32)
    given = vroom.Input()
    given.set_durations_matrix(profile="car", matrix_input=durations)
    given.set_distances_matrix(profile="car", matrix_input=distances)
    for i, (v, (start, end)) in enumerate(
        zip(problem.vehicles, problem.vehicle_places, strict=True)
    ):
        given.add_vehicle(
            vroom.Vehicle(
                i,
                start=start,
                end=end,
                profile="car",
                capacity=_amount(v.capacity, dims, UNLIMITED),
                skills={skill_ids[s] for s in v.skills},
                time_window=vroom.TimeWindow(*v.shift_s),
                max_travel_time=unreachable_s - 1,
            )
        )
    for j, (job, location) in enumerate(
        zip(problem.jobs, problem.job_places, strict=True)
    ):
        if j in left_out:  # unassigned below: VROOM need not search for it
            continue
        given.add_job(
            vroom.Job(
                j,
                location=location,
                default_service=job.service_s,
                delivery=vroom.Amount(_amount(job.demand, dims)),
                skills={skill_ids[s] for s in job.skills},
                priority=job.priority,
                time_windows=[
                    vroom.TimeWindow(a, b) for a, b in merge_windows(job.windows_s)
                ],
            )
        )
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    answer = given.solve(
        exploration_level=exploration_level,
        nb_threads=threads,
        timeout=timedelta(seconds=timeout_s),
    )
    return _plan(problem, answer.to_dict(), stranded)


def _unreachable_s(problem: Problem, jobs: int) -> int:
    """What stands in for "no route" in VROOM's integer matrix: as long as its cost
    bound allows. Every vehicle may drive one second less in all, so no plan can hold
    such a leg (a real tour that long, weeks of driving, is left undone)."""
    return COST_BOUND // (2 * len(problem.vehicles) + jobs + 1)


def merge_windows(
    windows: tuple[tuple[int, int], ...],
) -> tuple[tuple[int, int], ...]:
    """Windows sorted, with overlapping, touching and repeated ones made one.

    >>> merge_windows(((50, 60), (0, 10), (10, 20), (5, 8)))
    ((0, 20), (50, 60))
    """
    merged: list[tuple[int, int]] = []
    for open_s, close_s in sorted(windows):
        if merged and open_s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], close_s))
        else:
            merged.append((open_s, close_s))
    return tuple(merged)


def unassigned_reason(problem: Problem, job_index: int) -> str:
    """Why no vehicle took this job, as far as the specs alone can tell."""
    job = problem.jobs[job_index]
    if not _skilled(problem, job_index):
        return f"no vehicle has the skills {', '.join(sorted(job.skills))}"
    dims = _dimensions(problem)
    roomy = _suitable(problem, job_index, dims)
    if not roomy:
        return "its demand exceeds the capacity of every vehicle with its skills"
    if not _suitable_routable(problem, job_index, dims):
        return "no road route joins it to the start and end of any suitable vehicle"
    if not any(_reachable(problem, i, job_index) for i in roomy):
        return (
            "no vehicle with its skills and capacity can reach it within its time "
            "windows and come back within its shift"
        )
    return "the fleet's capacity or shift time went to other jobs"


def _skilled(problem: Problem, job_index: int) -> list[int]:
    skills = problem.jobs[job_index].skills
    return [i for i, v in enumerate(problem.vehicles) if skills <= v.skills]


def _suitable(problem: Problem, job_index: int, dims: int) -> list[int]:
    """The vehicles with the job's skills and room for its demand."""
    demand = np.array(_amount(problem.jobs[job_index].demand, dims))
    return [
        i
        for i in _skilled(problem, job_index)
        if np.all(demand <= _amount(problem.vehicles[i].capacity, dims, UNLIMITED))
    ]


def _suitable_routable(problem: Problem, job_index: int, dims: int) -> bool:
    """Whether a suitable vehicle has roads from its start and to its end."""
    here = problem.job_places[job_index]
    suitable = _suitable(problem, job_index, dims)
    return any(_routable(problem, i, here) for i in suitable)


def _servable(problem: Problem, dims: int) -> np.ndarray:
    """(jobs, vehicles): the vehicle has the job's skills, room for its demand, and
    roads from its start to the job and from the job to its end."""
    skilled = np.array(
        [[j.skills <= v.skills for v in problem.vehicles] for j in problem.jobs]
    )
    demand = np.array([_amount(j.demand, dims) for j in problem.jobs]).reshape(
        len(problem.jobs), dims
    )
    capacity = np.array(
        [_amount(v.capacity, dims, UNLIMITED) for v in problem.vehicles]
    ).reshape(len(problem.vehicles), dims)
    roomy = np.all(demand[:, None, :] <= capacity[None, :, :], axis=2)
    here = np.array(problem.job_places)
    routable = np.ones_like(skilled)
    for i, (start, end) in enumerate(problem.vehicle_places):
        if start is not None:
            routable[:, i] &= np.isfinite(problem.duration_s[start, here])
        if end is not None:
            routable[:, i] &= np.isfinite(problem.duration_s[here, end])
    return skilled & roomy & routable


def _routable(problem: Problem, vehicle: int, here: int) -> bool:
    start, end = problem.vehicle_places[vehicle]
    ok = start is None or np.isfinite(problem.duration_s[start, here])
    return bool(ok and (end is None or np.isfinite(problem.duration_s[here, end])))


def _reachable(problem: Problem, vehicle: int, job_index: int) -> bool:
    v = problem.vehicles[vehicle]
    job = problem.jobs[job_index]
    start, end = problem.vehicle_places[vehicle]
    here = problem.job_places[job_index]
    to_job = 0.0 if start is None else problem.duration_s[start, here]
    back = 0.0 if end is None else problem.duration_s[here, end]
    if not (np.isfinite(to_job) and np.isfinite(back)):
        return False
    windows = job.windows_s or ((0, FOREVER_S),)
    for open_s, close_s in windows:
        arrive = max(v.shift_s[0] + to_job, open_s)
        if arrive <= close_s and arrive + job.service_s + back <= v.shift_s[1]:
            return True
    return False


def _plan(problem: Problem, answer: dict, stranded: list[int]) -> Plan:
    vehicles = []
    for route in answer.get("routes", []):
        index = int(route["vehicle"])
        places = [int(step["location_index"]) for step in route["steps"]]
        _check_legs(problem, places)
        stops = []
        for step in route["steps"]:
            kind = step["type"]
            place = int(step["location_index"])
            job_id = problem.jobs[int(step["id"])].job_id if kind == "job" else ""
            stops.append(
                Stop(
                    kind=kind,
                    job_id=job_id,
                    lat=float(problem.lat[place]),
                    lon=float(problem.lon[place]),
                    arrival_s=int(step["arrival"]),
                    service_s=int(step["service"]),
                    waiting_s=int(step["waiting_time"]),
                    distance_m=float(step.get("distance", 0)),
                    load=tuple(int(x) for x in step.get("load", [])),
                )
            )
        vehicles.append(
            VehiclePlan(
                vehicle_id=problem.vehicles[index].vehicle_id,
                stops=stops,
                distance_m=float(route.get("distance", 0)),
                duration_s=int(route["duration"]),
            )
        )
    left = sorted(stranded + [int(u["id"]) for u in answer.get("unassigned", [])])
    unassigned = {problem.jobs[j].job_id: unassigned_reason(problem, j) for j in left}
    return Plan(vehicles, unassigned)


def _check_legs(problem: Problem, places: list[int]) -> None:
    """A plan never drives a leg without a road: every vehicle's maximum travel time
    is shorter than the matrix's stand-in for one, and this guards that promise."""
    legs = problem.duration_s[places[:-1], places[1:]]
    if not np.all(np.isfinite(legs)):
        raise TrackingError("the optimiser planned a leg that no road route joins")


def _check(vehicles: list[VehicleSpec], jobs: list[JobSpec]) -> None:
    if not vehicles:
        raise InvalidArgument("vehicles", "at least one vehicle is needed")
    if not jobs:
        raise InvalidArgument("jobs", "at least one job is needed")
    for field_name, ids in (
        ("vehicles", [v.vehicle_id for v in vehicles]),
        ("jobs", [j.job_id for j in jobs]),
    ):
        seen: set[str] = set()
        for i, item_id in enumerate(ids):
            if not item_id or item_id in seen:
                raise InvalidArgument(f"{field_name}[{i}].id", "must be set and unique")
            seen.add(item_id)
    for i, v in enumerate(vehicles):
        if v.start is None and v.end is None:
            raise InvalidArgument(f"vehicles[{i}]", "set start, end or both")
        if v.shift_s[0] > v.shift_s[1]:
            raise InvalidArgument(f"vehicles[{i}].shift", "starts after it ends")
        if not all(0 <= c <= UNLIMITED for c in v.capacity):
            raise InvalidArgument(
                f"vehicles[{i}].capacity", f"must be in [0, {UNLIMITED}]"
            )
    for i, j in enumerate(jobs):
        if any(a > b for a, b in j.windows_s):
            raise InvalidArgument(
                f"jobs[{i}].time_windows", "a window ends before it starts"
            )
        if not all(0 <= d <= UNLIMITED for d in j.demand):
            raise InvalidArgument(f"jobs[{i}].demand", f"must be in [0, {UNLIMITED}]")
        if not 0 <= j.priority <= 100:
            raise InvalidArgument(f"jobs[{i}].priority", "must be in [0, 100]")
        if j.service_s < 0:
            raise InvalidArgument(f"jobs[{i}].service_s", "must not be negative")
    _check_dimensions(vehicles, jobs)


def _check_dimensions(vehicles: list[VehicleSpec], jobs: list[JobSpec]) -> None:
    """Every capacity and demand given has as many values: the count most of them
    have (the first one's on a tie), and the first that differs is named."""
    amounts = [
        (f"vehicles[{i}].capacity", len(v.capacity)) for i, v in enumerate(vehicles)
    ] + [(f"jobs[{i}].demand", len(j.demand)) for i, j in enumerate(jobs)]
    given = [(field, size) for field, size in amounts if size]
    if not given:
        return
    counts = Counter(size for _, size in given)
    expected = max(counts, key=lambda size: (counts[size], -_first(given, size)))
    model = given[_first(given, expected)][0]
    for field_name, size in given:
        if size != expected:
            raise InvalidArgument(
                field_name,
                f"has {size} value{'s' * (size != 1)}, expected {expected} as "
                f"{model} has (every capacity and demand needs as many values)",
            )


def _first(given: list[tuple[str, int]], size: int) -> int:
    return next(i for i, (_, n) in enumerate(given) if n == size)


def _dimensions(problem: Problem) -> int:
    sizes = [len(v.capacity) for v in problem.vehicles] + [
        len(j.demand) for j in problem.jobs
    ]
    return max(sizes, default=0)


def _amount(values: tuple[int, ...], dims: int, missing: int = 0) -> list[int]:
    """A capacity or demand of ``dims`` values, ``missing`` each where none is given."""
    if values:
        return list(values)
    return [missing] * dims


def _all_skills(problem: Problem) -> list[str]:
    names: set[str] = set()
    for vehicle in problem.vehicles:
        names |= vehicle.skills
    for job in problem.jobs:
        names |= job.skills
    return sorted(names)
