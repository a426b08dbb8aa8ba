"""Route messages to and from the routing core's types, with field-named checks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polyline as polyline_codec
from tracking.v1 import common_pb2, route_pb2

from tracking_grpc import convert
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.core.validation import accuracy_refusal, bad_accuracy
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.ingest import now_ms
from tracking_grpc.routing import optimise
from tracking_grpc.routing.engine import POLYLINE_PRECISION, Matrix, Route, Snap
from tracking_grpc.routing.geometry import check_points
from tracking_grpc.routing.monitor import RouteProgress
from tracking_grpc.timestamps import LATEST_MS

PROFILES = {
    route_pb2.ROUTING_PROFILE_UNSPECIFIED: "car",
    route_pb2.ROUTING_PROFILE_CAR: "car",
    route_pb2.ROUTING_PROFILE_BICYCLE: "bicycle",
    route_pb2.ROUTING_PROFILE_FOOT: "foot",
}
PROFILE_VALUES = {"car": 1, "bicycle": 2, "foot": 3}
MAX_WAYPOINTS = 100
MAX_MATRIX_POINTS = 500
MAX_VEHICLES = 200
MAX_JOBS = 2_000
STOP_KINDS = {"start": 1, "job": 2, "end": 3}
MAX_SERVICE_S = 86_400  # a day at one stop


def profile(value: int, field: str = "profile") -> str:
    if value not in PROFILES:
        raise InvalidArgument(field, f"unknown routing profile {value}")
    return PROFILES[value]


def point(
    message: common_pb2.LatLng, field: str, present: bool = True
) -> tuple[float, float]:
    """A checked (lat, lon); ``present`` False means the field was never set."""
    if not present:
        raise InvalidArgument(field, "is required")
    check_points(field, np.array(message.lat), np.array(message.lon))
    return float(message.lat), float(message.lon)


def route_points(
    request: route_pb2.ComputeRouteRequest, prefix: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Origin, waypoints and destination of a route request as checked arrays."""
    if len(request.waypoints) > MAX_WAYPOINTS:
        raise InvalidArgument(f"{prefix}waypoints", f"at most {MAX_WAYPOINTS}")
    points = [point(request.origin, f"{prefix}origin", request.HasField("origin"))]
    points += [
        point(w, f"{prefix}waypoints[{i}]") for i, w in enumerate(request.waypoints)
    ]
    points.append(
        point(
            request.destination,
            f"{prefix}destination",
            request.HasField("destination"),
        )
    )
    lat, lon = np.array(points).T
    return lat, lon


def route_field(
    error: InvalidArgument, points: int, prefix: str = ""
) -> InvalidArgument:
    """The engine's ``waypoints[k]`` (all points in order) as the request's field."""
    if not error.field.startswith("waypoints["):
        return error
    k = int(error.field[len("waypoints[") : -1])
    name = (
        "origin"
        if k == 0
        else "destination"
        if k == points - 1
        else f"waypoints[{k - 1}]"
    )
    return InvalidArgument(prefix + name, error.reason)


def latlng_arrays(
    points: Sequence[common_pb2.LatLng], field: str, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    if not points:
        raise InvalidArgument(field, "at least one point is needed")
    if len(points) > limit:
        raise InvalidArgument(field, f"at most {limit} points")
    lat = np.array([p.lat for p in points], dtype=np.float64)
    lon = np.array([p.lon for p in points], dtype=np.float64)
    check_points(field, lat, lon)
    return lat, lon


def check_match_fixes(batch: FixBatch) -> None:
    """Fix times in [0, LATEST_MS] and accuracies, where given, in [0,
    MAX_ACCURACY_M]: the ones ingest accepts (``bad_accuracy``, its own test)."""
    bad_time = (batch.time_ms < 0) | (batch.time_ms > LATEST_MS)
    if bad_time.any():
        i = int(np.argmax(bad_time))
        reason = f"must be epoch milliseconds in [0, {LATEST_MS}] (9999-01-01)"
        raise InvalidArgument(f"fixes[{i}].time_ms", reason)
    refused = bad_accuracy(batch.accuracy_m)  # ingest's own test; NaN: not given
    if refused.any():
        i = int(np.argmax(refused))
        reason = accuracy_refusal(float(batch.accuracy_m[i]))
        raise InvalidArgument(f"fixes[{i}].accuracy_m", reason)


def latlng(lat: float, lon: float) -> common_pb2.LatLng:
    return common_pb2.LatLng(lat=lat, lon=lon)


def geojson(lat: np.ndarray, lon: np.ndarray) -> str:
    coordinates = np.column_stack((np.round(lon, 6), np.round(lat, 6))).tolist()
    return json.dumps({"type": "LineString", "coordinates": coordinates})


def encoded(lat: np.ndarray, lon: np.ndarray) -> str:
    return polyline_codec.encode(
        np.column_stack((lat, lon)).tolist(), POLYLINE_PRECISION
    )


def snapped(snaps: list[Snap]) -> list[route_pb2.SnappedPoint]:
    return [
        route_pb2.SnappedPoint(
            location=latlng(s.lat, s.lon), distance_m=s.distance_m, name=s.name
        )
        for s in snaps
    ]


def route_plan(route: Route, expected_s: float) -> route_pb2.RoutePlan:
    return route_pb2.RoutePlan(
        profile=PROFILE_VALUES[route.profile],
        distance_m=route.distance_m,
        duration_s=route.duration_s,
        expected_duration_s=expected_s,
        polyline=route.encoded_polyline,
        geojson=geojson(route.lat, route.lon),
        legs=[
            route_pb2.RouteLeg(
                distance_m=leg.distance_m,
                duration_s=leg.duration_s,
                steps=[
                    route_pb2.RouteStep(
                        maneuver=s.maneuver,
                        modifier=s.modifier,
                        name=s.name,
                        distance_m=s.distance_m,
                        duration_s=s.duration_s,
                        location=latlng(s.lat, s.lon),
                    )
                    for s in leg.steps
                ],
            )
            for leg in route.legs
        ],
        snapped=snapped(route.snaps),
    )


def matrix_response(matrix: Matrix) -> route_pb2.ComputeMatrixResponse:
    rows, columns = matrix.duration_s.shape
    return route_pb2.ComputeMatrixResponse(
        rows=rows,
        columns=columns,
        duration_s=np.nan_to_num(matrix.duration_s, nan=-1.0).ravel().tolist(),
        distance_m=np.nan_to_num(matrix.distance_m, nan=-1.0).ravel().tolist(),
        sources=snapped(matrix.sources),
        destinations=snapped(matrix.destinations),
    )


def progress_message(device: str, progress: RouteProgress) -> route_pb2.RouteProgress:
    return route_pb2.RouteProgress(
        device_id=device,
        route_id=progress.route_id,
        total_m=progress.total_m,
        progress_m=progress.progress_m,
        remaining_m=progress.remaining_m,
        eta_ms=progress.eta_ms,
        off_route=progress.off_route,
        deviation_m=progress.deviation_m,
        arrived=progress.arrived,
        last_fix_ms=progress.last_fix_ms,
    )


def problem_specs(
    request: route_pb2.OptimizeRouteRequest,
) -> tuple[list[optimise.VehicleSpec], list[optimise.JobSpec], int]:
    """Vehicles and jobs with times in seconds from the returned origin (epoch ms)."""
    if len(request.vehicles) > MAX_VEHICLES:
        raise InvalidArgument("vehicles", f"at most {MAX_VEHICLES}")
    if len(request.jobs) > MAX_JOBS:
        raise InvalidArgument("jobs", f"at most {MAX_JOBS}")
    _check_windows(request)
    departure_ms = request.departure_ms or now_ms()
    # Times count from the earliest a vehicle may start.
    starts = [departure_ms]
    starts += [v.shift.start_ms for v in request.vehicles if v.shift.start_ms]
    clock = PlanClock(min(starts))
    vehicles = [
        _vehicle(v, f"vehicles[{i}]", clock, departure_ms)
        for i, v in enumerate(request.vehicles)
    ]
    jobs = [_job(j, f"jobs[{i}]", clock) for i, j in enumerate(request.jobs)]
    return vehicles, jobs, clock.origin_ms


@dataclass(frozen=True, slots=True)
class PlanClock:
    """Epoch milliseconds as the optimiser's whole seconds from ``origin_ms``.

    The optimiser counts in 32-bit seconds, so a plan spans ``optimise.FOREVER_S``
    at most: a time that opens a window beyond it is refused, one that closes a
    window beyond it means "no end". A window that closed before the origin is a
    window at 0, which no vehicle reaches.
    """

    origin_ms: int

    def seconds(self, ms: int) -> int:
        return max((ms - self.origin_ms) // 1000, 0)

    def opens(self, ms: int, field: str) -> int:
        seconds = self.seconds(ms)
        if seconds > optimise.FOREVER_S:
            reason = "lies more than 10 years after the earliest vehicle start"
            raise InvalidArgument(field, reason)
        return seconds

    def closes(self, ms: int) -> int:
        return min(self.seconds(ms), 2 * optimise.FOREVER_S)


def _vehicle(
    v: route_pb2.Vehicle, field: str, clock: PlanClock, departure_ms: int
) -> optimise.VehicleSpec:
    if v.shift.start_ms:
        start_s = clock.opens(v.shift.start_ms, f"{field}.shift.start_ms")
    else:  # no shift, or one without a start: from departure_ms on
        start_s = clock.opens(departure_ms, "departure_ms")
    if v.shift.end_ms:
        shift = (start_s, clock.closes(v.shift.end_ms))
    else:  # open-ended
        shift = (start_s, start_s + optimise.FOREVER_S)
    return optimise.VehicleSpec(
        vehicle_id=convert.check_device_id(v.id, f"{field}.id"),
        start=point(v.start, f"{field}.start") if v.HasField("start") else None,
        end=point(v.end, f"{field}.end") if v.HasField("end") else None,
        capacity=tuple(v.capacity),
        shift_s=shift,
        skills=_skills(v.skills, f"{field}.skills"),
    )


def _skills(skills: Sequence[str], field: str) -> frozenset[str]:
    """Skills follow the device id rule (:func:`convert.device_id_fault`)."""
    return frozenset(convert.check_device_ids(skills, field))


def _job(j: route_pb2.Job, field: str, clock: PlanClock) -> optimise.JobSpec:
    if not (np.isfinite(j.service_s) and 0 <= j.service_s <= MAX_SERVICE_S):
        raise InvalidArgument(
            f"{field}.service_s", f"must be a number in [0, {MAX_SERVICE_S}]"
        )
    windows = tuple(
        (
            clock.opens(w.start_ms, f"{field}.time_windows[{k}].start_ms"),
            clock.closes(w.end_ms),
        )
        for k, w in enumerate(j.time_windows)
    )
    return optimise.JobSpec(
        job_id=convert.check_device_id(j.id, f"{field}.id"),
        location=point(j.location, f"{field}.location", j.HasField("location")),
        service_s=round(j.service_s),
        windows_s=windows,
        demand=tuple(j.demand),
        priority=j.priority,
        skills=_skills(j.skills, f"{field}.skills"),
    )


def _check_windows(request: route_pb2.OptimizeRouteRequest) -> None:
    """Times out of range, and shifts and job windows that end before they start,
    named as sent."""
    _check_time(request.departure_ms, "departure_ms")
    for i, v in enumerate(request.vehicles):
        if v.HasField("shift"):
            _check_window(v.shift, f"vehicles[{i}].shift", open_ended=True)
    for i, j in enumerate(request.jobs):
        for k, w in enumerate(j.time_windows):
            _check_window(w, f"jobs[{i}].time_windows[{k}]")


def _check_window(
    window: route_pb2.TimeWindow, field: str, open_ended: bool = False
) -> None:
    """``open_ended``: an unset (0) end means no end (a shift)."""
    _check_time(window.start_ms, f"{field}.start_ms")
    _check_time(window.end_ms, f"{field}.end_ms")
    if window.end_ms < window.start_ms and not (open_ended and window.end_ms == 0):
        raise InvalidArgument(field, "ends before it starts")


def _check_time(ms: int, field: str) -> None:
    if not 0 <= ms <= LATEST_MS:
        raise InvalidArgument(
            field, f"must be epoch milliseconds in [0, {LATEST_MS}] (9999-01-01)"
        )


def plan_response(
    plan: optimise.Plan, origin_ms: int
) -> route_pb2.OptimizeRouteResponse:
    return route_pb2.OptimizeRouteResponse(
        routes=[
            route_pb2.VehicleRoute(
                vehicle_id=v.vehicle_id,
                distance_m=v.distance_m,
                duration_s=v.duration_s,
                stops=[
                    route_pb2.PlannedStop(
                        kind=STOP_KINDS[s.kind],
                        job_id=s.job_id,
                        location=latlng(s.lat, s.lon),
                        arrival_ms=origin_ms + s.arrival_s * 1000,
                        waiting_s=s.waiting_s,
                        service_s=s.service_s,
                        distance_m=s.distance_m,
                        load=list(s.load),
                    )
                    for s in v.stops
                ],
            )
            for v in plan.vehicles
        ],
        unassigned=[
            route_pb2.UnassignedJob(job_id=job_id, reason=reason)
            for job_id, reason in plan.unassigned.items()
        ],
        distance_m=plan.distance_m,
    )
