"""History: stored tracks, trips, stops, daily summaries, places and heatmaps."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import grpc
import numpy as np
from tracking.v1 import common_pb2, history_pb2, history_pb2_grpc

from tracking_grpc import convert, erasure
from tracking_grpc.activity import export, fencetime, patterns, views
from tracking_grpc.activity.queries import DeviceHistory, load
from tracking_grpc.app import App
from tracking_grpc.auth import Caller, Role
from tracking_grpc.core import precision
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.core.geodesy import in_box, in_circle
from tracking_grpc.errors import InvalidArgument, NotFound
from tracking_grpc.geofence.index import FenceIndex
from tracking_grpc.geofence.messages import check_fence_id
from tracking_grpc.geofence.model import FenceSpec
from tracking_grpc.servicers.geofence import open_repositories
from tracking_grpc.storage.fences import FenceRepository
from tracking_grpc.timestamps import check_time_zone

log = logging.getLogger(__name__)

CHUNK_POSITIONS = 1_000
MAX_TOLERANCE_M = 100_000.0
MAX_FENCE_IDS = 10_000
FORMATS = {
    history_pb2.EXPORT_FORMAT_GPX: "gpx",
    history_pb2.EXPORT_FORMAT_GEOJSON: "geojson",
    history_pb2.EXPORT_FORMAT_CSV: "csv",
}


def _latlng(lat: float, lon: float) -> common_pb2.LatLng:
    return common_pb2.LatLng(lat=lat, lon=lon)


def _place(place) -> history_pb2.Place:
    return history_pb2.Place(
        time_ms=place.time_ms, position=_latlng(place.lat, place.lon), seq=place.seq
    )


def _on_grid(lat: float, lon: float, precision_m: float) -> common_pb2.LatLng:
    """A derived position (an average of fixes) as a caller limited to
    ``precision_m`` may see it: averaging cell centres lands between them, finer
    than the grid, so it goes back to its cell's centre (0: unchanged)."""
    if precision_m <= 0:
        return _latlng(lat, lon)
    cell_lat, cell_lon, _ = precision.snap([lat], [lon], precision_m)
    return _latlng(float(cell_lat[0]), float(cell_lon[0]))


def _frequent(
    place: patterns.Place, precision_m: float = 0.0
) -> history_pb2.FrequentPlace:
    return history_pb2.FrequentPlace(
        center=_on_grid(place.lat, place.lon, precision_m),
        visit_count=place.visit_count,
        total_dwell_s=place.total_dwell_s,
        first_visit_ms=place.first_visit_ms,
        last_visit_ms=place.last_visit_ms,
    )


def _coarse_trip(trip: history_pb2.Trip, precision_m: float) -> None:
    """A trip as a caller limited to ``precision_m`` may see it: its distance in
    whole cells, its average speed from that distance, and no top speed (a step
    between cell centres says nothing of how fast the device went)."""
    trip.distance_m = float(precision.round_m(trip.distance_m, precision_m))
    trip.avg_speed_mps = trip.distance_m / trip.duration_s if trip.duration_s else 0.0
    trip.max_speed_mps = 0.0


def _clip_mask(fixes: FixBatch, area: common_pb2.Area) -> np.ndarray:
    shape = area.WhichOneof("shape")
    if shape == "box":
        return in_box(fixes.lat, fixes.lon, *convert.check_box(area.box, "clip.box"))
    if shape == "circle":
        c = area.circle
        convert.require(c, "center", "clip.circle.center")
        if not (math.isfinite(c.center.lat) and abs(c.center.lat) <= 90):
            raise InvalidArgument("clip.circle.center.lat", "must be in ±90")
        if not (math.isfinite(c.center.lon) and abs(c.center.lon) <= 180):
            raise InvalidArgument("clip.circle.center.lon", "must be in ±180")
        if not (math.isfinite(c.radius_m) and c.radius_m > 0):
            raise InvalidArgument("clip.circle.radius_m", "must be > 0")
        return in_circle(fixes.lat, fixes.lon, c.center.lat, c.center.lon, c.radius_m)
    raise InvalidArgument("clip", "set box or circle")


class HistoryServicer(history_pb2_grpc.HistoryServicer):
    """Read-only queries over stored fixes of one device at a time."""

    def __init__(self, app: App, fences: FenceRepository) -> None:
        self.app = app
        self.fences = fences

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        return caller

    async def _load(self, caller: Caller, request) -> DeviceHistory:
        device = convert.check_device_id(request.device_id, "device_id")
        return await load(
            self.app.history,
            self.app.activity.config,
            caller.tenant,
            device,
            request.start_ms,
            request.end_ms,
            caller.precision_m,
        )

    async def _track(self, caller: Caller, request: history_pb2.GetTrackRequest):
        tolerance = request.simplify_tolerance_m
        if not (math.isfinite(tolerance) and 0 <= tolerance <= MAX_TOLERANCE_M):
            raise InvalidArgument("simplify_tolerance_m", "must be in [0, 100000]")
        found = await self._load(caller, request)
        kind = request.kind
        if kind in (history_pb2.TRACK_KIND_UNSPECIFIED, history_pb2.TRACK_KIND_RAW):
            fixes = found.fixes
        elif kind == history_pb2.TRACK_KIND_CLEAN:
            fixes = views.clean(found.analysis)
        elif kind == history_pb2.TRACK_KIND_SMOOTHED:
            fixes = views.smoothed(found.analysis)
        else:
            raise InvalidArgument("kind", f"unknown track kind {kind}")
        # Smoothing coarse fixes makes positions between cell centres: they are
        # snapped again (raw fixes are cell centres already).
        fixes = precision.resnap(fixes, caller.precision_m)
        if request.HasField("clip"):
            fixes = fixes.take(_clip_mask(fixes, request.clip))
        return views.simplify(fixes, tolerance)

    async def GetTrack(
        self, request: history_pb2.GetTrackRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[history_pb2.GetTrackResponse]:
        """A device's fixes in a time range, in fix-time order, streamed in chunks."""
        fixes = await self._track(self._caller(context), request)
        for start in range(0, len(fixes), CHUNK_POSITIONS):
            part = fixes.take(
                np.arange(start, min(start + CHUNK_POSITIONS, len(fixes)))
            )
            yield history_pb2.GetTrackResponse(positions=convert.positions(part))

    async def ExportTrack(
        self, request: history_pb2.ExportTrackRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[history_pb2.ExportTrackResponse]:
        """The track as a GPX, GeoJSON or CSV document, in chunks of bytes."""
        caller = self._caller(context)
        name = FORMATS.get(request.format)
        if name is None:
            raise InvalidArgument("format", "set GPX, GEOJSON or CSV")
        try:
            fixes = await self._track(caller, request.track)
        except InvalidArgument as exc:  # the track's fields sit under `track`
            raise InvalidArgument(f"track.{exc.field}", exc.reason) from exc
        first = True
        for piece in export.WRITERS[name](fixes, request.track.device_id):
            yield history_pb2.ExportTrackResponse(
                content_type=export.CONTENT_TYPES[name] if first else "",
                data=piece.encode(),
            )
            first = False

    async def ListTrips(
        self, request: history_pb2.ListTripsRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.ListTripsResponse:
        """Trips in a time range, with distance, duration and speeds."""
        caller = self._caller(context)
        found = await self._load(caller, request)
        trips = []
        for t in found.trips():
            trip = history_pb2.Trip(
                start=_place(t.start),
                end=_place(t.end),
                distance_m=t.distance_m,
                duration_s=t.duration_s,
                avg_speed_mps=t.avg_speed_mps,
                max_speed_mps=t.max_speed_mps,
                fix_count=t.fix_count,
            )
            if caller.precision_m > 0:
                _coarse_trip(trip, caller.precision_m)
            trips.append(trip)
        return history_pb2.ListTripsResponse(trips=trips)

    async def ListStops(
        self, request: history_pb2.ListStopsRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.ListStopsResponse:
        """Stops in a time range."""
        caller = self._caller(context)
        found = await self._load(caller, request)
        coarse = caller.precision_m
        return history_pb2.ListStopsResponse(
            stops=[
                history_pb2.Stop(
                    start_ms=s.start_ms,
                    end_ms=s.end_ms,
                    duration_s=s.duration_s,
                    center=_on_grid(s.lat, s.lon, coarse),
                    radius_m=float(precision.round_m(s.radius_m, coarse)),
                    fix_count=s.fix_count,
                )
                for s in found.stops()
            ]
        )

    def _time_zone(self, caller: Caller, request) -> str:
        if request.time_zone:
            return check_time_zone(request.time_zone, "time_zone")
        return self.app.activity.config.time_zone(caller.tenant, request.device_id)

    async def DailySummary(
        self,
        request: history_pb2.DailySummaryRequest,
        context: grpc.aio.ServicerContext,
    ) -> history_pb2.DailySummaryResponse:
        """Distance, moving and stopped time per local calendar day."""
        caller = self._caller(context)
        zone = self._time_zone(caller, request)
        found = await self._load(caller, request)
        days = patterns.daily_summary(
            found.analysis,
            found.trips(),
            found.stops(),
            request.start_ms,
            request.end_ms,
            zone,
        )
        return history_pb2.DailySummaryResponse(
            time_zone=zone,
            days=[
                history_pb2.DaySummary(
                    date=d.date,
                    distance_m=float(
                        precision.round_m(d.distance_m, caller.precision_m)
                    ),
                    moving_s=d.moving_s,
                    stopped_s=d.stopped_s,
                    trip_count=d.trip_count,
                    # From steps between cell centres: no speed for a coarse caller.
                    max_speed_mps=0.0 if caller.precision_m > 0 else d.max_speed_mps,
                    fix_count=d.fix_count,
                    first_fix_ms=d.first_fix_ms,
                    last_fix_ms=d.last_fix_ms,
                )
                for d in days
            ],
        )

    async def FrequentPlaces(
        self,
        request: history_pb2.FrequentPlacesRequest,
        context: grpc.aio.ServicerContext,
    ) -> history_pb2.FrequentPlacesResponse:
        """Places the device stops at again and again."""
        caller = self._caller(context)
        radius = request.place_radius_m or 100.0
        if not (math.isfinite(radius) and 0 < radius <= 5000):
            raise InvalidArgument("place_radius_m", "must be in (0, 5000]")
        limit = request.limit or 20
        if limit > 1000:
            raise InvalidArgument("limit", "at most 1000")
        found = await self._load(caller, request)
        places = patterns.frequent_places(found.stops(), radius)[:limit]
        return history_pb2.FrequentPlacesResponse(
            places=[_frequent(p, caller.precision_m) for p in places]
        )

    async def HomeWork(
        self, request: history_pb2.HomeWorkRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.HomeWorkResponse:
        """The likely home and work places."""
        caller = self._caller(context)
        zone = self._time_zone(caller, request)
        found = await self._load(caller, request)
        stops = found.stops()
        places = patterns.frequent_places(stops, 100.0)
        home, work = patterns.home_and_work(
            stops, places, request.start_ms, request.end_ms, zone
        )
        response = history_pb2.HomeWorkResponse(time_zone=zone)
        if home is not None:
            response.home.CopyFrom(
                history_pb2.RolePlace(
                    place=_frequent(home[0], caller.precision_m), role_dwell_s=home[1]
                )
            )
        if work is not None:
            response.work.CopyFrom(
                history_pb2.RolePlace(
                    place=_frequent(work[0], caller.precision_m), role_dwell_s=work[1]
                )
            )
        return response

    async def Heatmap(
        self, request: history_pb2.HeatmapRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.HeatmapResponse:
        """Trusted fixes counted per H3 cell."""
        caller = self._caller(context)
        resolution = request.resolution if request.HasField("resolution") else 9
        if resolution > 15:
            raise InvalidArgument("resolution", "must be 0-15")
        found = await self._load(caller, request)
        fixes = views.clean(found.analysis)
        cells = patterns.heatmap(fixes.lat, fixes.lon, resolution)
        return history_pb2.HeatmapResponse(
            resolution=resolution,
            cells=[
                history_pb2.HeatCell(
                    cell=cell,
                    fix_count=count,
                    center=_latlng(*patterns.cell_center(cell)),
                )
                for cell, count in cells
            ],
        )

    async def TimeInFences(
        self,
        request: history_pb2.TimeInFencesRequest,
        context: grpc.aio.ServicerContext,
    ) -> history_pb2.TimeInFencesResponse:
        """Time the device spent inside each geofence of the tenant."""
        caller = self._caller(context)
        if len(request.fence_ids) > MAX_FENCE_IDS:
            raise InvalidArgument("fence_ids", f"at most {MAX_FENCE_IDS}")
        wanted = set(request.fence_ids)
        for i, fence_id in enumerate(request.fence_ids):
            if not fence_id:
                raise InvalidArgument(f"fence_ids[{i}]", "must not be empty")
            check_fence_id(fence_id, f"fence_ids[{i}]")
        found = await self._load(caller, request)
        fixes = views.clean(found.analysis)
        async with self._fence_index(caller.tenant) as index:
            unknown = sorted(wanted.difference(index.row_of))
            if unknown:
                raise NotFound(f"fence_ids: no fence {unknown[0]!r} in this tenant")
            times = fencetime.time_in_fences(
                index, fixes.time_ms, fixes.lat, fixes.lon, found.params.max_gap_s
            )
        return history_pb2.TimeInFencesResponse(
            fences=[
                history_pb2.FenceTime(
                    fence_id=f.fence_id,
                    inside_s=f.inside_s,
                    visit_count=f.visit_count,
                    first_inside_ms=f.first_inside_ms,
                    last_inside_ms=f.last_inside_ms,
                )
                for f in times
                if not wanted or f.fence_id in wanted
            ]
        )

    @asynccontextmanager
    async def _fence_index(self, tenant: str) -> AsyncIterator[FenceIndex]:
        """The geofence processor's index of the tenant's fences (kept between
        calls; building one for 20,000 fences took seconds, on the event loop)."""
        if self.app.fence_index is not None:
            async with self.app.fence_index(tenant) as index:
                yield index
            return
        # cast: the repository protocol's `list` method shadows the builtin for mypy
        specs = cast("list[FenceSpec]", await self.fences.all(tenant))
        yield await asyncio.to_thread(FenceIndex.build, specs)

    async def GetActivity(
        self, request: history_pb2.GetActivityRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.GetActivityResponse:
        """The device's live activity: as this server process applies its fixes,
        else as last saved (by any process) and brought up to date from history."""
        caller = self._caller(context)
        device = convert.check_device_id(request.device_id, "device_id")
        state = await self.app.activity.current(caller.tenant, device)
        if state is None:
            raise NotFound(f"no activity saved or seen for device {device!r}")
        applied = math.isfinite(state.lat) and math.isfinite(state.smoothed_lat)
        lat, lon = [state.lat, state.smoothed_lat], [state.lon, state.smoothed_lon]
        distances = [state.trip_distance_m, state.odometer_m]
        if caller.precision_m > 0:
            coarse_lat, coarse_lon, _ = precision.snap(lat, lon, caller.precision_m)
            lat, lon = coarse_lat.tolist(), coarse_lon.tolist()
            distances = precision.round_m(distances, caller.precision_m).tolist()
        return history_pb2.GetActivityResponse(
            device_id=device,
            online=state.online,
            last_seen_ms=state.last_seen_ms,
            motion=int(state.motion),
            in_stop=state.in_stop,
            stop_since_ms=state.stop_since_ms if state.in_stop else 0,
            in_trip=state.in_trip,
            trip_since_ms=max(state.trip_since_ms, 0),
            trip_distance_m=distances[0],
            odometer_m=distances[1],
            time_ms=max(state.time_ms, 0),
            position=_latlng(lat[0], lon[0]) if applied else None,
            smoothed_position=_latlng(lat[1], lon[1]) if applied else None,
        )

    async def EraseDevice(
        self, request: history_pb2.EraseDeviceRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.EraseDeviceResponse:
        """Erase one device of the caller's tenant everywhere; admin only."""
        caller = self.app.auth.caller(context)
        caller.require(Role.ADMIN)
        device = convert.check_erasable_device_id(request.device_id, "device_id")
        erased = await erasure.erase_device(self.app, caller.tenant, device)
        return history_pb2.EraseDeviceResponse(
            device_id=device,
            fixes_erased=erased.fixes,
            events_erased=erased.events,
            live_position_erased=erased.live_position,
            memberships_erased=erased.memberships,
            activity_erased=erased.activity,
            route_erased=erased.route,
            sequence_reset=erased.sequence_reset,
            stream_entries_erased=erased.stream_entries,
        )


def register(server: grpc.aio.Server, app: App) -> str:
    fences, _ = open_repositories(app)  # a reader of the Geofence service's store
    history_pb2_grpc.add_HistoryServicer_to_server(HistoryServicer(app, fences), server)
    return history_pb2.DESCRIPTOR.services_by_name["History"].full_name
