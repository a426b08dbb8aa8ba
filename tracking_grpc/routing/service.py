"""The routing side of the application: engines, learned travel times, monitor.

:class:`Routing` is what the Route servicer calls. OSRM calls run in a worker thread,
but osrm-bindings keeps the GIL while it works, so they are kept small (a route is
about a millisecond, the largest table allowed well under a second). VROOM keeps the
GIL too and may search for seconds, so plans are solved in a separate process. The
monitor runs on the event loop, as a processor of the ingest pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from tracking_grpc.config import Settings
from tracking_grpc.errors import InvalidArgument, Unavailable
from tracking_grpc.observability import tracing
from tracking_grpc.routing import optimise
from tracking_grpc.routing.assignments import AssignmentKeeper
from tracking_grpc.routing.engine import Match, Matrix, Route, Router
from tracking_grpc.routing.learning import TravelTimes
from tracking_grpc.routing.monitor import (
    MonitorSettings,
    PlannedRoute,
    RouteMonitor,
    RouteProgress,
)
from tracking_grpc.storage.base import HistoryStore

log = logging.getLogger(__name__)

MIN_MATCH_RADIUS_M = 10.0
MAX_MATCH_RADIUS_M = 60.0
DEFAULT_MATCH_RADIUS_M = 30.0


def monitor_settings(settings: Settings) -> MonitorSettings:
    return MonitorSettings(
        off_route_m=settings.route_off_route_m,
        off_route_fixes=settings.route_off_route_fixes,
        back_on_route_fixes=settings.route_back_on_route_fixes,
        arrival_radius_m=settings.route_arrival_radius_m,
        eta_change_s=settings.route_eta_change_s,
    )


class Routing:
    """Routes, tables, plans, matching and monitoring for every tenant."""

    def __init__(self, router: Router, keeper: AssignmentKeeper) -> None:
        self.router = router
        self.keeper = keeper
        self.monitor = keeper.monitor
        self.travel_times = TravelTimes()
        self._solver: ProcessPoolExecutor | None = None

    async def close(self) -> None:
        if self._solver is not None:
            self._solver.shutdown(wait=True, cancel_futures=True)
            self._solver = None

    @classmethod
    def from_settings(cls, settings: Settings, store: HistoryStore) -> Routing:
        """Routing on the settings' datasets; assigned routes kept in ``store``."""
        router = Router.load(settings.routing_data_dir, settings.routing_max_snap_m)
        monitor = RouteMonitor(monitor_settings(settings))
        keeper = AssignmentKeeper(
            monitor,
            store,
            settings.route_checkpoint_s,
            load_page=settings.route_load_page,
        )
        return cls(router, keeper)

    async def route(
        self, tenant: str, profile: str, lat: np.ndarray, lon: np.ndarray, steps: bool
    ) -> tuple[Route, float]:
        """A route and its expected duration from learned travel times."""
        engine = self.router.engine(profile)
        with tracing.span("routing.route", profile=profile, points=len(lat)):
            route = await asyncio.to_thread(engine.route, lat, lon, steps=steps)
        model = self.travel_times.model(tenant, profile)
        return route, model.expected_duration_s(route)

    async def matrix(
        self,
        profile: str,
        lat: np.ndarray,
        lon: np.ndarray,
        sources: list[int],
        destinations: list[int],
    ) -> Matrix:
        engine = self.router.engine(profile)
        for name, indices in (("sources", sources), ("destinations", destinations)):
            bad = [i for i in indices if i >= len(lat)]
            if bad:
                raise InvalidArgument(name, f"index {bad[0]} is not a point index")
        with tracing.span("routing.table", profile=profile, points=len(lat)):
            return await asyncio.to_thread(
                engine.table, lat, lon, sources, destinations
            )

    async def optimise(
        self,
        profile: str,
        vehicles: list[optimise.VehicleSpec],
        jobs: list[optimise.JobSpec],
    ) -> optimise.Plan:
        engine = self.router.engine(profile)
        problem = await asyncio.to_thread(
            optimise.build_problem, engine, vehicles, jobs
        )
        loop = asyncio.get_running_loop()
        with tracing.span("routing.optimise", profile=profile, jobs=len(jobs)):
            for attempt in range(2):
                solver = self._solver_pool()
                try:
                    return await loop.run_in_executor(solver, optimise.solve, problem)
                except BrokenProcessPool as exc:
                    # The process died (killed, out of memory): a pool stays broken
                    # for good, so the next one is new. The solve is tried once more.
                    self._drop_solver(solver)
                    if attempt:
                        raise Unavailable("the route solver process died") from exc
                    log.warning("the route solver process died; starting another")
        raise AssertionError("unreachable")

    def _solver_pool(self) -> ProcessPoolExecutor:
        if self._solver is None:
            spawn = multiprocessing.get_context("spawn")
            self._solver = ProcessPoolExecutor(max_workers=1, mp_context=spawn)
        return self._solver

    def _drop_solver(self, solver: ProcessPoolExecutor) -> None:
        if self._solver is solver:
            self._solver = None
        solver.shutdown(wait=False, cancel_futures=True)

    async def match(
        self,
        tenant: str,
        profile: str,
        lat: np.ndarray,
        lon: np.ndarray,
        time_ms: np.ndarray,
        accuracy_m: np.ndarray,
        learn: bool,
    ) -> tuple[Match, int]:
        """Map matching of a track; learns travel times from it when asked."""
        engine = self.router.engine(profile)
        if np.any(np.diff(time_ms) < 0):
            raise InvalidArgument("fixes", "fix times must not decrease")
        radius = np.where(
            np.isfinite(accuracy_m), accuracy_m * 2.0, DEFAULT_MATCH_RADIUS_M
        )
        radius = np.clip(radius, MIN_MATCH_RADIUS_M, MAX_MATCH_RADIUS_M)
        time_s = np.asarray(time_ms, dtype=np.int64) // 1000
        with tracing.span("routing.match", profile=profile, points=len(lat)):
            match = await asyncio.to_thread(engine.match, lat, lon, time_s, radius)
        learned = 0
        if learn:
            model = self.travel_times.model(tenant, profile)
            learned = model.observe_match(match, time_ms / 1000.0)
            log.info(
                "tenant %s %s: learned from %d legs, factor now %.2f",
                tenant,
                profile,
                learned,
                model.global_factor,
            )
        return match, learned

    async def assign(
        self,
        tenant: str,
        device: str,
        route_id: str,
        profile: str,
        lat: np.ndarray,
        lon: np.ndarray,
        now_ms: int,
        deadline: float | None = None,
    ) -> tuple[Route, float, RouteProgress]:
        """Plan a route and monitor the device on it (in every process);
        ``deadline``: the call's, in event-loop time (None: none), until just before
        which it waits for the start's load once the route is planned."""
        route, expected_s = await self.route(tenant, profile, lat, lon, steps=True)
        model = self.travel_times.model(tenant, profile)
        planned = PlannedRoute(
            tenant=tenant,
            device=device,
            route_id=route_id or uuid.uuid4().hex,
            lat=route.lat,
            lon=route.lon,
            segment_expected_s=model.segment_durations_s(route),
            assigned_ms=now_ms,
        )
        return route, expected_s, await self.keeper.assign(planned, deadline)
