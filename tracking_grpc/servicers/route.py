"""Route: routes, matrices, stop-order optimisation, map matching, route monitoring."""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
from tracking.v1 import route_pb2, route_pb2_grpc

from tracking_grpc import convert
from tracking_grpc.activity.queries import check_range
from tracking_grpc.app import App
from tracking_grpc.auth import Role
from tracking_grpc.core import precision
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import InvalidArgument, NotFound
from tracking_grpc.ingest import now_ms
from tracking_grpc.routing import datasets
from tracking_grpc.routing.assignments import HELD
from tracking_grpc.routing.service import Routing
from tracking_grpc.servicers import route_convert as rc
from tracking_grpc.storage.redis_client import Connection
from tracking_grpc.storage.redis_notices import RedisDeviceNotices

log = logging.getLogger(__name__)

SERVICE_NAME = route_pb2.DESCRIPTOR.services_by_name["Route"].full_name
MAX_MATCH_FIXES = 20_000
ROUTE_NOTICES = "routes"  # the Redis Stream of route notices, after the key prefix


class RouteServicer(route_pb2_grpc.RouteServicer):
    def __init__(self, app: App, routing: Routing) -> None:
        self.app = app
        self.routing = routing

    async def ComputeRoute(
        self, request: route_pb2.ComputeRouteRequest, context: grpc.aio.ServicerContext
    ) -> route_pb2.ComputeRouteResponse:
        """The fastest route through the request's points."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        profile = rc.profile(request.profile)
        lat, lon = rc.route_points(request)
        try:
            route, expected_s = await self.routing.route(
                caller.tenant, profile, lat, lon, steps=not request.skip_steps
            )
        except InvalidArgument as exc:
            raise rc.route_field(exc, len(lat)) from exc
        return route_pb2.ComputeRouteResponse(route=rc.route_plan(route, expected_s))

    async def ComputeMatrix(
        self, request: route_pb2.ComputeMatrixRequest, context: grpc.aio.ServicerContext
    ) -> route_pb2.ComputeMatrixResponse:
        """Durations and distances between points."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        profile = rc.profile(request.profile)
        lat, lon = rc.latlng_arrays(request.points, "points", rc.MAX_MATRIX_POINTS)
        matrix = await self.routing.matrix(
            profile, lat, lon, list(request.sources), list(request.destinations)
        )
        return rc.matrix_response(matrix)

    async def OptimizeRoute(
        self, request: route_pb2.OptimizeRouteRequest, context: grpc.aio.ServicerContext
    ) -> route_pb2.OptimizeRouteResponse:
        """Each vehicle's ordered stops, and the jobs no vehicle could take."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        profile = rc.profile(request.profile)
        vehicles, jobs, origin_ms = rc.problem_specs(request)
        plan = await self.routing.optimise(profile, vehicles, jobs)
        return rc.plan_response(plan, origin_ms)

    async def MatchTrack(
        self, request: route_pb2.MatchTrackRequest, context: grpc.aio.ServicerContext
    ) -> route_pb2.MatchTrackResponse:
        """The track snapped to the roads, per fix and per matched piece."""
        caller = self.app.auth.caller(context)
        caller.require(Role.ADMIN if request.learn_travel_times else Role.VIEWER)
        profile = rc.profile(request.profile)
        batch = await self._track(caller.tenant, request)
        if request.device_id:  # stored fixes: matched as the caller may see them
            batch = precision.coarsen(batch, caller.precision_m)
        match, learned = await self.routing.match(
            caller.tenant,
            profile,
            batch.lat,
            batch.lon,
            batch.time_ms,
            batch.accuracy_m.astype(np.float64),
            request.learn_travel_times,
        )
        distance = sum(m.distance_m for m in match.matchings)
        weights = np.array([m.distance_m for m in match.matchings])
        confidences = np.array([m.confidence for m in match.matchings])
        confidence = (
            float((weights * confidences).sum() / weights.sum())
            if weights.sum() > 0
            else float(confidences.mean())
            if len(confidences)
            else 0.0
        )
        return route_pb2.MatchTrackResponse(
            points=[
                route_pb2.MatchedPoint(
                    matched=bool(ok),
                    location=rc.latlng(a, b) if ok else None,
                    matching_index=int(k),
                )
                for ok, a, b, k in zip(
                    match.matched.tolist(),
                    match.lat.tolist(),
                    match.lon.tolist(),
                    match.matching_index.tolist(),
                    strict=True,
                )
            ],
            matchings=[
                route_pb2.Matching(
                    confidence=m.confidence,
                    distance_m=m.distance_m,
                    duration_s=m.duration_s,
                    polyline=rc.encoded(m.lat, m.lon),
                    geojson=rc.geojson(m.lat, m.lon),
                )
                for m in match.matchings
            ],
            matched_share=float(match.matched.mean()),
            matched_distance_m=distance,
            confidence=confidence,
            learned_legs=learned,
        )

    async def AssignRoute(
        self, request: route_pb2.AssignRouteRequest, context: grpc.aio.ServicerContext
    ) -> route_pb2.AssignRouteResponse:
        """Plan the route and monitor the device on it from its next fix on."""
        caller = self.app.auth.caller(context)
        caller.require(Role.ADMIN)
        device = convert.check_device_id(request.device_id, "device_id")
        if request.route_id:  # empty: the service names the route
            convert.check_device_id(request.route_id, "route_id")
        if not request.HasField("route"):
            raise InvalidArgument("route", "is required")
        profile = rc.profile(request.route.profile, "route.profile")
        lat, lon = rc.route_points(request.route, "route.")
        try:
            route, expected_s, progress = await self.routing.assign(
                caller.tenant,
                device,
                request.route_id,
                profile,
                lat,
                lon,
                now_ms(),
                call_deadline(context),
            )
        except InvalidArgument as exc:
            raise rc.route_field(exc, len(lat), "route.") from exc
        log.info("route %s assigned to %s", progress.route_id, device)
        return route_pb2.AssignRouteResponse(
            route=rc.route_plan(route, expected_s),
            progress=rc.progress_message(device, progress),
        )

    async def ClearRoute(
        self, request: route_pb2.ClearRouteRequest, context: grpc.aio.ServicerContext
    ) -> route_pb2.ClearRouteResponse:
        """Stop monitoring the device."""
        caller = self.app.auth.caller(context)
        caller.require(Role.ADMIN)
        device = convert.check_device_id(request.device_id, "device_id")
        cleared = await self.routing.keeper.clear(
            caller.tenant, device, call_deadline(context)
        )
        return route_pb2.ClearRouteResponse(cleared=cleared)

    async def GetRouteProgress(
        self,
        request: route_pb2.GetRouteProgressRequest,
        context: grpc.aio.ServicerContext,
    ) -> route_pb2.GetRouteProgressResponse:
        """Progress, ETA and off-route state of the device on its route (from
        another process's checkpoint when that one applies the device's fixes)."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        device = convert.check_device_id(request.device_id, "device_id")
        progress = await self.routing.keeper.progress(
            caller.tenant, device, call_deadline(context)
        )
        if progress is None:
            raise NotFound(f"device {device!r} has no assigned route")
        message = rc.progress_message(device, progress)
        if caller.precision_m > 0:  # distances along a known route place the device
            for name in ("progress_m", "remaining_m", "deviation_m"):
                metres = precision.round_m(getattr(message, name), caller.precision_m)
                setattr(message, name, float(metres))
            message.eta_ms = precision.round_eta_ms(
                message.eta_ms, message.last_fix_ms, caller.precision_m
            )
        return route_pb2.GetRouteProgressResponse(progress=message)

    async def _track(
        self, tenant: str, request: route_pb2.MatchTrackRequest
    ) -> FixBatch:
        if request.fixes and request.device_id:
            raise InvalidArgument("fixes", "give fixes or device_id, not both")
        if request.fixes:
            if len(request.fixes) > MAX_MATCH_FIXES:
                raise InvalidArgument("fixes", f"at most {MAX_MATCH_FIXES} fixes")
            batch = convert.fixes_to_batch(tenant, "track", request.fixes)
            rc.latlng_arrays(request.fixes, "fixes", MAX_MATCH_FIXES)
            rc.check_match_fixes(batch)
        else:
            if not request.device_id:
                raise InvalidArgument(
                    "fixes", "give fixes, or a device_id with start_ms and end_ms"
                )
            device = convert.check_device_id(request.device_id, "device_id")
            check_range(request.start_ms, request.end_ms)  # as the History RPCs
            batch = await self.app.history.history(
                tenant, device, request.start_ms, request.end_ms, MAX_MATCH_FIXES
            )
        if len(batch) < 2 and request.fixes:
            raise InvalidArgument("fixes", "a track needs at least 2 fixes")
        if len(batch) < 2:
            reason = (
                f"has {len(batch)} stored fixes from start_ms to end_ms; "
                "a track needs at least 2"
            )
            raise InvalidArgument("device_id", reason)
        return batch


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline in event-loop time (None: it has none), taken when the
    call starts, so that a wait after other work ends before it."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


async def _forget_route(routing: Routing, tenant: str, device: str) -> dict[str, int]:
    """Erasure: the device's monitored route, if it had one."""
    return {"route": int(routing.monitor.clear(tenant, device))}


def register(server: grpc.aio.Server, app: App) -> str:
    """Load the routing datasets, add the servicer and the route monitor."""
    routing = Routing.from_settings(app.settings, app.history)
    keeper = routing.keeper
    if not routing.router.available:
        app.not_ready.add(SERVICE_NAME)
        # Off by default: no data directory is a choice, not a fault to act on.
        level = logging.WARNING if app.settings.routing_data_dir else logging.INFO
        log.log(level, "Route service not ready: %s", datasets.PREPARE_HINT)
    app.pipeline.add_processor(keeper)
    app.drains.append(keeper.stop)  # after the pipeline's last fixes
    if app.settings.redis_url:  # other server processes may monitor the routes
        notices = RedisDeviceNotices(
            Connection(app.settings.redis_url, name="tracking-route-notices"),
            app.settings.redis_key_prefix,
            keeper.heard,
            stream=ROUTE_NOTICES,
            subject="route",
            heard_level=logging.DEBUG,
            others={HELD: keeper.released},
        )
        keeper.announce = notices.announce_many
        keeper.start(listen=notices.start)
        app.closers.append(notices.close)
    else:
        keeper.start()
    app.state_forgetters.append(
        lambda tenant, device: _forget_route(routing, tenant, device)
    )
    app.purgers.append(keeper.forget_arrived)
    app.closers.append(routing.close)
    route_pb2_grpc.add_RouteServicer_to_server(RouteServicer(app, routing), server)
    return SERVICE_NAME
