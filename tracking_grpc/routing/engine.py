"""Routes, tables and map matching on prepared OSRM datasets.

:class:`RoutingEngine` wraps one loaded dataset (one profile); :class:`Router` holds
the engines of every profile found in the routing data directory. Calls block (OSRM
runs them in C++): the servicer runs them in a worker thread.

OSRM always snaps a point to the nearest road; a point snapped further than
``max_snap_m`` is refused with INVALID_ARGUMENT saying how far it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import osrm
import polyline

from tracking_grpc.errors import FailedPrecondition, InvalidArgument, NotFound
from tracking_grpc.routing import datasets
from tracking_grpc.routing.geometry import check_points

log = logging.getLogger(__name__)

DEFAULT_MAX_SNAP_M = 500.0
POLYLINE_PRECISION = 6


@dataclass(frozen=True, slots=True)
class Snap:
    """Where an input point landed on the road network."""

    lat: float
    lon: float
    distance_m: float
    name: str


@dataclass(frozen=True, slots=True)
class Step:
    """One manoeuvre of a leg."""

    maneuver: str
    modifier: str
    name: str
    distance_m: float
    duration_s: float
    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class Leg:
    distance_m: float
    duration_s: float
    steps: list[Step]


@dataclass(frozen=True, slots=True)
class Route:
    """A computed route; ``lat``/``lon`` are its full geometry."""

    profile: str
    distance_m: float
    duration_s: float
    lat: np.ndarray
    lon: np.ndarray
    segment_distance_m: np.ndarray  # one per geometry segment
    segment_duration_s: np.ndarray
    legs: list[Leg]
    snaps: list[Snap]

    @property
    def encoded_polyline(self) -> str:
        """Google encoded polyline at precision 6 (1e-6 degree)."""
        points = np.column_stack((self.lat, self.lon)).tolist()
        return polyline.encode(points, POLYLINE_PRECISION)


@dataclass(frozen=True, slots=True)
class Matrix:
    """Travel times and distances; NaN where no route exists."""

    duration_s: np.ndarray  # (sources, destinations)
    distance_m: np.ndarray
    sources: list[Snap]
    destinations: list[Snap]


@dataclass(frozen=True, slots=True)
class Matching:
    """One matched piece of a track (a track splits at gaps it cannot bridge)."""

    confidence: float
    distance_m: float
    duration_s: float
    lat: np.ndarray
    lon: np.ndarray
    leg_duration_s: np.ndarray  # between consecutive matched points
    leg_distance_m: np.ndarray
    segment_distance_m: np.ndarray
    segment_duration_s: np.ndarray


@dataclass(frozen=True, slots=True)
class Match:
    """Map matching of a track: per input point, where it matched (or not)."""

    matched: np.ndarray  # bool per input point
    matching_index: np.ndarray  # int per input point, -1 when not matched
    lat: np.ndarray  # snapped position, NaN when not matched
    lon: np.ndarray
    matchings: list[Matching] = field(default_factory=list)


class RoutingEngine:
    """One OSRM dataset of one profile."""

    def __init__(
        self, dataset: datasets.Dataset, max_snap_m: float = DEFAULT_MAX_SNAP_M
    ) -> None:
        self.dataset = dataset
        self.profile = dataset.profile
        self.max_snap_m = max_snap_m
        self._osrm = osrm.OSRM(
            storage_config=str(dataset.base_path),
            algorithm="MLD",
            use_shared_memory=False,
        )
        log.info("loaded %s routing dataset %s", self.profile, dataset.base_path)

    def route(self, lat: np.ndarray, lon: np.ndarray, *, steps: bool = True) -> Route:
        """The fastest route through the points in order (origin, vias, destination)."""
        lat, lon = _points("waypoints", lat, lon, least=2)
        params = osrm.RouteParameters(
            coordinates=list(zip(lon.tolist(), lat.tolist(), strict=True)),
            steps=steps,
            overview="full",
            geometries="geojson",
            annotations=["duration", "distance"],
            generate_hints=False,
        )
        answer = self._call(self._osrm.Route, params)
        snaps = self._snaps(answer["waypoints"], "waypoints")
        best = answer["routes"][0]
        coords = np.asarray(best["geometry"]["coordinates"], dtype=np.float64)
        legs = [_leg(leg) for leg in best["legs"]]
        seg_m = np.concatenate(
            [np.asarray(leg["annotation"]["distance"], float) for leg in best["legs"]]
        )
        seg_s = np.concatenate(
            [np.asarray(leg["annotation"]["duration"], float) for leg in best["legs"]]
        )
        return Route(
            profile=self.profile,
            distance_m=float(best["distance"]),
            duration_s=float(best["duration"]),
            lat=coords[:, 1].copy(),
            lon=coords[:, 0].copy(),
            segment_distance_m=seg_m,
            segment_duration_s=seg_s,
            legs=legs,
            snaps=snaps,
        )

    def table(
        self,
        lat: np.ndarray,
        lon: np.ndarray,
        sources: list[int] | None = None,
        destinations: list[int] | None = None,
    ) -> Matrix:
        """Durations and distances from each source to each destination."""
        lat, lon = _points("points", lat, lon, least=1)
        if len(lat) == 1:  # OSRM's table takes two or more: the point twice, once each
            lat, lon = np.repeat(lat, 2), np.repeat(lon, 2)
            sources, destinations = [0], [1]
        params = osrm.TableParameters(
            coordinates=list(zip(lon.tolist(), lat.tolist(), strict=True)),
            sources=sources or [],
            destinations=destinations or [],
            annotations=["duration", "distance"],
            generate_hints=False,
        )
        answer = self._call(self._osrm.Table, params)
        return Matrix(
            duration_s=_grid(answer["durations"]),
            distance_m=_grid(answer["distances"]),
            sources=self._snaps(answer["sources"], "points"),
            destinations=self._snaps(answer["destinations"], "points"),
        )

    def match(
        self,
        lat: np.ndarray,
        lon: np.ndarray,
        time_s: np.ndarray,
        radius_m: np.ndarray,
    ) -> Match:
        """Snap a recorded track (fix times in s, increasing) to the roads."""
        lat, lon = _points("points", lat, lon, least=2)
        params = osrm.MatchParameters(
            coordinates=list(zip(lon.tolist(), lat.tolist(), strict=True)),
            timestamps=np.asarray(time_s, dtype=np.int64).tolist(),
            radiuses=np.asarray(radius_m, dtype=np.float64).tolist(),
            gaps="split",
            tidy=False,
            overview="full",
            geometries="geojson",
            annotations=["duration", "distance"],
            generate_hints=False,
        )
        n = len(lat)
        empty = Match(
            matched=np.zeros(n, bool),
            matching_index=np.full(n, -1, np.int64),
            lat=np.full(n, np.nan),
            lon=np.full(n, np.nan),
        )
        try:
            answer = self._call(self._osrm.Match, params)
        except NotFound:
            return empty
        except InvalidArgument as exc:
            if exc.reason.startswith("Could not find a matching segment"):
                return empty  # no fix lies near any road: nothing matches
            raise
        for i, point in enumerate(answer["tracepoints"]):
            if point is not None:
                empty.matched[i] = True
                empty.matching_index[i] = int(point["matchings_index"])
                empty.lon[i], empty.lat[i] = point["location"]
        empty.matchings.extend(_matching(m) for m in answer["matchings"])
        return empty

    def _call(self, method: Any, params: Any) -> dict[str, Any]:
        try:
            return _plain(method(params))
        except RuntimeError as exc:
            code, _, message = str(exc).partition(" - ")
            if code in {"NoRoute", "NoMatch", "NoTrips"}:
                raise NotFound(f"{self.profile}: {message or code}") from exc
            if code == "NoSegment":
                raise InvalidArgument(
                    "points", f"{message.rstrip('.')} within the {self.profile} network"
                ) from exc
            if code in {"TooBig", "InvalidValue", "InvalidOptions", "InvalidQuery"}:
                raise InvalidArgument("points", f"{code}: {message}") from exc
            raise

    def _snaps(self, waypoints: list[dict[str, Any]], field_name: str) -> list[Snap]:
        snaps = []
        for i, point in enumerate(waypoints):
            lon, lat = point["location"]
            snaps.append(Snap(lat, lon, float(point["distance"]), point["name"]))
            if point["distance"] > self.max_snap_m:
                raise InvalidArgument(
                    f"{field_name}[{i}]",
                    f"{point['distance']:.0f} m from the nearest road of the "
                    f"{self.profile} network (at most {self.max_snap_m:.0f} m)",
                )
        return snaps


class Router:
    """The engines of every prepared profile; empty when no dataset is loaded."""

    def __init__(self, engines: dict[str, RoutingEngine], data_dir: str = "") -> None:
        self.engines = engines
        self.data_dir = data_dir

    @classmethod
    def load(cls, data_dir: str, max_snap_m: float = DEFAULT_MAX_SNAP_M) -> Router:
        """Load every dataset under ``data_dir``; an empty string loads none."""
        if not data_dir:
            return cls({}, "")
        found = datasets.discover(Path(data_dir))
        if not found:
            log.warning(
                "no routing dataset under %s: %s", data_dir, datasets.PREPARE_HINT
            )
        engines = {p: RoutingEngine(d, max_snap_m) for p, d in found.items()}
        return cls(engines, data_dir)

    @property
    def available(self) -> bool:
        return bool(self.engines)

    def engine(self, profile: str) -> RoutingEngine:
        """The engine of a profile, or FAILED_PRECONDITION saying how to prepare it."""
        engine = self.engines.get(profile)
        if engine is None:
            where = f" under {self.data_dir}" if self.data_dir else ""
            hint = datasets.PREPARE_HINT
            raise FailedPrecondition(
                f"no {profile} routing dataset is loaded{where}: {hint}"
            )
        return engine


def _points(
    name: str, lat: np.ndarray, lon: np.ndarray, least: int
) -> tuple[np.ndarray, np.ndarray]:
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    if lat.shape != lon.shape or len(lat) < least:
        raise InvalidArgument(name, f"needs at least {least} points")
    check_points(name, lat, lon)
    return lat, lon


def _plain(value: Any) -> Any:
    """OSRM's result objects as dicts and lists (never index them from the end:
    ``Array[-1]`` reads out of bounds in osrm-bindings 26.10)."""
    if isinstance(value, osrm.Object):
        return {key: _plain(value[key]) for key in value}
    if isinstance(value, osrm.Array):
        return [_plain(item) for item in value]
    return value


def _grid(rows: list[list[float | None]]) -> np.ndarray:
    return np.array(
        [[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64
    )


def _leg(leg: dict[str, Any]) -> Leg:
    steps = []
    for step in leg.get("steps", []):
        maneuver = step["maneuver"]
        lon, lat = maneuver["location"]
        steps.append(
            Step(
                maneuver=maneuver["type"],
                modifier=maneuver.get("modifier", ""),
                name=step.get("name", ""),
                distance_m=float(step["distance"]),
                duration_s=float(step["duration"]),
                lat=lat,
                lon=lon,
            )
        )
    return Leg(float(leg["distance"]), float(leg["duration"]), steps)


def _matching(matching: dict[str, Any]) -> Matching:
    coords = np.asarray(matching["geometry"]["coordinates"], dtype=np.float64)
    legs = matching["legs"]
    return Matching(
        confidence=float(matching["confidence"]),
        distance_m=float(matching["distance"]),
        duration_s=float(matching["duration"]),
        lat=coords[:, 1].copy(),
        lon=coords[:, 0].copy(),
        leg_duration_s=np.array([leg["duration"] for leg in legs], dtype=np.float64),
        leg_distance_m=np.array([leg["distance"] for leg in legs], dtype=np.float64),
        segment_distance_m=np.concatenate(
            [np.asarray(leg["annotation"]["distance"], float) for leg in legs]
            or [np.zeros(0)]
        ),
        segment_duration_s=np.concatenate(
            [np.asarray(leg["annotation"]["duration"], float) for leg in legs]
            or [np.zeros(0)]
        ),
    )
