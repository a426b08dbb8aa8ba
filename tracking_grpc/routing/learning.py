"""Travel-time factors learned from observed trips.

OSRM's durations are free-flow speeds from the profile: in a city they run well under
what vehicles take. :class:`TravelTimeModel` learns, from matched recorded trips, the
ratio of observed to engine time over the whole area and per H3 cell (resolution 8,
about 0.7 km²), and scales route durations by it. A cell's ratio is shrunk towards
the area's ratio until it has seen ``prior_s`` seconds of engine time, so a cell seen
once moves the estimate only a little.

>>> model = TravelTimeModel()
>>> kept = model.observe(np.array([41.15]), np.array([-8.61]), np.array([60.0]),
...                      np.array([120.0]))
>>> float(model.global_factor)
2.0
"""

from __future__ import annotations

import logging
import threading

import h3
import numpy as np

from tracking_grpc.routing.engine import Match, Route

log = logging.getLogger(__name__)

H3_RESOLUTION = 8
# What says nothing about driving speed: a gap between fixes longer than this, and a
# matched piece of trip so short or so slow (a taxi waiting at its stand) overall.
MAX_GAP_S = 300.0
MIN_PIECE_ENGINE_S = 10.0
MAX_PIECE_RATIO = 8.0


class TravelTimeModel:
    """Observed/engine time ratios, for one tenant and profile."""

    def __init__(self, resolution: int = H3_RESOLUTION, prior_s: float = 600.0) -> None:
        self.resolution = resolution
        self.prior_s = prior_s
        self._engine_s: dict[str, float] = {}
        self._observed_s: dict[str, float] = {}
        self.engine_total_s = 0.0
        self.observed_total_s = 0.0
        self._lock = threading.Lock()

    @property
    def global_factor(self) -> float:
        """Observed over engine time over everything seen; 1 before any trip."""
        if self.engine_total_s <= 0.0:
            return 1.0
        return self.observed_total_s / self.engine_total_s

    def observe(
        self,
        lat: np.ndarray,
        lon: np.ndarray,
        engine_s: np.ndarray,
        observed_s: np.ndarray,
    ) -> int:
        """Learn from legs of trips located at (lat, lon); returns legs kept.

        Legs with a stop in them count: waiting at lights is part of city time.
        """
        keep = (observed_s > 0.0) & (observed_s <= MAX_GAP_S) & (engine_s >= 0.0)
        cells = self._cells(lat[keep], lon[keep])
        with self._lock:
            for cell, eng, obs in zip(
                cells, engine_s[keep], observed_s[keep], strict=True
            ):
                self._engine_s[cell] = self._engine_s.get(cell, 0.0) + float(eng)
                self._observed_s[cell] = self._observed_s.get(cell, 0.0) + float(obs)
            self.engine_total_s += float(engine_s[keep].sum())
            self.observed_total_s += float(observed_s[keep].sum())
        return int(keep.sum())

    def observe_match(self, match: Match, time_s: np.ndarray) -> int:
        """Learn from a matched track: fix-time gap against engine time per leg."""
        kept = 0
        for index, matching in enumerate(match.matchings):
            points = np.flatnonzero(match.matching_index == index)
            if len(points) < 2 or len(matching.leg_duration_s) != len(points) - 1:
                continue
            observed = np.diff(np.asarray(time_s, dtype=np.float64)[points])
            engine = matching.leg_duration_s
            if engine.sum() < MIN_PIECE_ENGINE_S or (
                observed.sum() > MAX_PIECE_RATIO * engine.sum()
            ):
                continue
            mid_lat = (match.lat[points[:-1]] + match.lat[points[1:]]) / 2.0
            mid_lon = (match.lon[points[:-1]] + match.lon[points[1:]]) / 2.0
            kept += self.observe(mid_lat, mid_lon, engine, observed)
        return kept

    def factors(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """The learned factor at each point (the area's factor where a cell is new)."""
        base = self.global_factor
        cells = self._cells(lat, lon)
        with self._lock:
            eng = np.array([self._engine_s.get(c, 0.0) for c in cells])
            obs = np.array([self._observed_s.get(c, 0.0) for c in cells])
        return (obs + self.prior_s * base) / (eng + self.prior_s)

    def segment_durations_s(self, route: Route) -> np.ndarray:
        """Expected time of each geometry segment of a route."""
        if len(route.segment_duration_s) == 0:
            return route.segment_duration_s.copy()
        mid_lat = (route.lat[:-1] + route.lat[1:]) / 2.0
        mid_lon = (route.lon[:-1] + route.lon[1:]) / 2.0
        return route.segment_duration_s * self.factors(mid_lat, mid_lon)

    def expected_duration_s(self, route: Route) -> float:
        """The route's duration as learned trips suggest."""
        return float(self.segment_durations_s(route).sum())

    def _cells(self, lat: np.ndarray, lon: np.ndarray) -> list[str]:
        res = self.resolution
        return [
            h3.latlng_to_cell(a, b, res)
            for a, b in zip(lat.tolist(), lon.tolist(), strict=True)
        ]


class TravelTimes:
    """The models of every tenant and profile."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], TravelTimeModel] = {}

    def model(self, tenant: str, profile: str) -> TravelTimeModel:
        key = (tenant, profile)
        if key not in self._models:
            self._models[key] = TravelTimeModel()
        return self._models[key]
