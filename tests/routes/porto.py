"""Porto taxi trips inside the porto_centre extract, matched and timed over the RPCs.

Shared by the Porto tests and the route benchmark. Fix k of a trip was taken 15 s
after fix k-1; a trip's real duration runs from its first to its last matched fix.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tracking.v1 import common_pb2, route_pb2, route_pb2_grpc

SOUTH, WEST, NORTH, EAST = 41.125, -8.621, 41.156, -8.594
INTERVAL_MS = 15_000
ACCURACY_M = 15.0  # gives the 30 m search radius OSRM needs at 15 s sampling


@dataclass(frozen=True, slots=True)
class Trip:
    trip_id: str
    time_ms: np.ndarray
    lat: np.ndarray
    lon: np.ndarray


@dataclass(frozen=True, slots=True)
class MatchedTrip:
    trip: Trip
    share: float
    confidence: float
    pieces: int
    lat: np.ndarray  # matched fixes only, snapped
    lon: np.ndarray
    time_ms: np.ndarray

    @property
    def duration_s(self) -> float:
        return float(self.time_ms[-1] - self.time_ms[0]) / 1000.0


def trips_inside(path: Path, min_fixes: int = 4) -> list[Trip]:
    """Trips whose every fix lies inside the extract's box."""
    trips = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["POLYLINE"] in ("NA", "[]") or row["MISSING_DATA"] == "True":
                continue
            points = np.array(json.loads(row["POLYLINE"]), dtype=np.float64)
            if len(points) < min_fixes:
                continue
            lon, lat = points[:, 0], points[:, 1]
            inside = (lat > SOUTH) & (lat < NORTH) & (lon > WEST) & (lon < EAST)
            if inside.all():
                start = int(row["TIMESTAMP"]) * 1000
                times = start + INTERVAL_MS * np.arange(len(points), dtype=np.int64)
                trips.append(Trip(row["TRIP_ID"], times, lat, lon))
    return trips


def match_request(trip: Trip, learn: bool = False) -> route_pb2.MatchTrackRequest:
    fixes = [
        common_pb2.Fix(seq=i + 1, time_ms=t, lat=a, lon=b, accuracy_m=ACCURACY_M)
        for i, (t, a, b) in enumerate(
            zip(
                trip.time_ms.tolist(), trip.lat.tolist(), trip.lon.tolist(), strict=True
            )
        )
    ]
    return route_pb2.MatchTrackRequest(fixes=fixes, learn_travel_times=learn)


async def match(stub: route_pb2_grpc.RouteStub, trip: Trip) -> MatchedTrip:
    answer = await stub.MatchTrack(match_request(trip))
    matched = np.array([p.matched for p in answer.points], dtype=bool)
    lat = np.array([p.location.lat for p in answer.points])[matched]
    lon = np.array([p.location.lon for p in answer.points])[matched]
    return MatchedTrip(
        trip,
        answer.matched_share,
        answer.confidence,
        len(answer.matchings),
        lat,
        lon,
        trip.time_ms[matched],
    )


async def learn(stub: route_pb2_grpc.RouteStub, trips: list[MatchedTrip]) -> int:
    legs = 0
    for matched in trips:
        legs += (await stub.MatchTrack(match_request(matched.trip, True))).learned_legs
    return legs


async def eta_s(
    stub: route_pb2_grpc.RouteStub, matched: MatchedTrip
) -> tuple[float, float]:
    """Engine and learned durations of the route from the trip's first matched fix
    to its last: the ETA a dispatcher would have been given at the start."""
    request = route_pb2.ComputeRouteRequest(
        origin=common_pb2.LatLng(lat=matched.lat[0], lon=matched.lon[0]),
        destination=common_pb2.LatLng(lat=matched.lat[-1], lon=matched.lon[-1]),
        skip_steps=True,
    )
    plan = (await stub.ComputeRoute(request)).route
    return plan.duration_s, plan.expected_duration_s


def timed(trips: list[MatchedTrip]) -> list[MatchedTrip]:
    """Trips matched in one piece over at least a minute: the ones an ETA is for."""
    return [t for t in trips if t.pieces == 1 and t.duration_s >= 60]


def eta_errors(
    actual_s: np.ndarray, before_s: np.ndarray, after_s: np.ndarray
) -> dict[str, dict[str, float]]:
    """Absolute and relative ETA errors against the real durations."""
    return {
        name: {
            "mean_abs_s": float(np.mean(np.abs(eta - actual_s))),
            "median_abs_s": float(np.median(np.abs(eta - actual_s))),
            "mape": float(np.mean(np.abs(eta - actual_s) / actual_s)),
            "median_ratio": float(np.median(actual_s / np.maximum(eta, 1.0))),
        }
        for name, eta in (("before", before_s), ("after", after_s))
    }
