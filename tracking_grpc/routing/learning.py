"""Travel-time factors learned from observed trips.

OSRM's durations are free-flow speeds from the profile: in a city they run well under
what vehicles take. :class:`TravelTimeModel` learns, from matched recorded trips, the
ratio of observed to engine time of each trip, and keeps its geometric mean over the
whole area and per H3 cell (resolution 8, about 0.7 km²) that the trips crossed,
weighted by the observed seconds spent in the cell. The geometric mean keeps one odd
trip (a taxi idling, a wrong match) from dragging the factor. A cell's factor is
shrunk towards the area's until it has seen ``prior_s`` observed seconds.

>>> model = TravelTimeModel()
>>> model.observe(np.array([41.15]), np.array([-8.61]), np.array([60.0]), 2.0)
>>> round(model.global_factor, 3)
2.0
"""

from __future__ import annotations

import logging
import math
import threading

import h3
import numpy as np

from tracking_grpc.routing.engine import Match, Route

log = logging.getLogger(__name__)

H3_RESOLUTION = 8
# A gap between fixes longer than this says nothing about driving speed. A trip
# piece shorter than MIN_PIECE_ENGINE_S (engine time) is not learned from, nor one
# slower than MAX_PIECE_RATIO times the engine (a taxi waiting at its stand), nor one
# faster than MIN_PIECE_RATIO times it: free-flow times are already fast, so such a
# piece was matched to a longer path than the vehicle took.
MAX_GAP_S = 300.0
MIN_PIECE_ENGINE_S = 10.0
MIN_PIECE_RATIO = 0.7
MAX_PIECE_RATIO = 8.0


class TravelTimeModel:
    """Observed/engine time ratios, for one tenant and profile."""

    def __init__(
        self, resolution: int = H3_RESOLUTION, prior_s: float = 3600.0
    ) -> None:
        self.resolution = resolution
        self.prior_s = prior_s
        self._weight_s: dict[str, float] = {}
        self._log_ratio_s: dict[str, float] = {}
        self.weight_total_s = 0.0
        self.log_ratio_total_s = 0.0
        self.trips = 0
        self._lock = threading.Lock()

    @property
    def global_factor(self) -> float:
        """The area's factor; 1 before any trip."""
        if self.weight_total_s <= 0.0:
            return 1.0
        return math.exp(self.log_ratio_total_s / self.weight_total_s)

    def observe(
        self, lat: np.ndarray, lon: np.ndarray, observed_s: np.ndarray, ratio: float
    ) -> None:
        """Learn one trip piece's ratio over the places (leg midpoints) it crossed."""
        log_ratio = math.log(ratio)
        cells = self._cells(lat, lon)
        with self._lock:
            for cell, seconds in zip(cells, observed_s.tolist(), strict=True):
                self._weight_s[cell] = self._weight_s.get(cell, 0.0) + seconds
                self._log_ratio_s[cell] = (
                    self._log_ratio_s.get(cell, 0.0) + seconds * log_ratio
                )
            total = float(observed_s.sum())
            self.weight_total_s += total
            self.log_ratio_total_s += total * log_ratio
            self.trips += 1

    def observe_match(self, match: Match, time_s: np.ndarray) -> int:
        """Learn from a matched track; returns how many legs it learned from."""
        legs = 0
        for index, matching in enumerate(match.matchings):
            points = np.flatnonzero(match.matching_index == index)
            engine = matching.leg_duration_s
            if len(points) < 2 or len(engine) != len(points) - 1:
                continue
            observed = np.diff(np.asarray(time_s, dtype=np.float64)[points])
            usable = observed <= MAX_GAP_S
            engine_total = float(engine[usable].sum())
            if engine_total < MIN_PIECE_ENGINE_S:
                continue
            ratio = float(observed[usable].sum()) / engine_total
            if not MIN_PIECE_RATIO <= ratio <= MAX_PIECE_RATIO:
                continue
            mid_lat = (match.lat[points[:-1]] + match.lat[points[1:]]) / 2.0
            mid_lon = (match.lon[points[:-1]] + match.lon[points[1:]]) / 2.0
            self.observe(mid_lat[usable], mid_lon[usable], observed[usable], ratio)
            legs += int(usable.sum())
        return legs

    def factors(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """The learned factor at each point (the area's factor where a cell is new)."""
        if self.weight_total_s <= 0.0:
            return np.ones(len(lat))
        base = self.log_ratio_total_s / self.weight_total_s
        cells = self._cells(lat, lon)
        with self._lock:
            weight = np.array([self._weight_s.get(c, 0.0) for c in cells])
            log_ratio = np.array([self._log_ratio_s.get(c, 0.0) for c in cells])
        return np.exp((log_ratio + self.prior_s * base) / (weight + self.prior_s))

    def segment_durations_s(self, route: Route) -> np.ndarray:
        """Expected time of each geometry segment of a route.

        OSRM's per-segment durations leave out turn costs, which its route duration
        includes: the segments are scaled to add up to the route's duration first.
        """
        seconds = route.segment_duration_s
        if len(seconds) == 0:
            return seconds.copy()
        if seconds.sum() > 0:
            seconds = seconds * (route.duration_s / seconds.sum())
        else:
            seconds = np.full(len(seconds), route.duration_s / len(seconds))
        mid_lat = (route.lat[:-1] + route.lat[1:]) / 2.0
        mid_lon = (route.lon[:-1] + route.lon[1:]) / 2.0
        return seconds * self.factors(mid_lat, mid_lon)

    def expected_duration_s(self, route: Route) -> float:
        """The route's duration as learned trips suggest, in tenths of a second
        (the engine's own unit; the sum's float noise is of no use to anyone)."""
        return round(float(self.segment_durations_s(route).sum()), 1)

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
