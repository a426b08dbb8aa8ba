"""Geofence: fences of a tenant, checks against them, and their events."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from tracking.v1 import geofence_pb2, geofence_pb2_grpc

from tracking_grpc import convert, streams
from tracking_grpc.app import App
from tracking_grpc.auth import Role
from tracking_grpc.config import Settings
from tracking_grpc.errors import InvalidArgument, ResourceExhausted, Unavailable
from tracking_grpc.geofence.delivery import (
    EventFilter,
    EventStoreListener,
    EventWatchHub,
    StreamPublisher,
    StreamWatchFeed,
)
from tracking_grpc.geofence.messages import (
    FENCE_ID,
    check_fence_id,
    check_labels,
    fence_message,
    fence_of,
    fences_of_feature_collection,
    listened_types,
)
from tracking_grpc.geofence.model import FenceSpec
from tracking_grpc.geofence.processor import GeofenceProcessor
from tracking_grpc.geofence.shapes import check_lat_lon
from tracking_grpc.geofence.stream_trim import EventStreamTrimmer
from tracking_grpc.servicers.event_messages import event_messages
from tracking_grpc.storage.fences import (
    NOT_ISSUED,
    EventQuery,
    EventRepository,
    FenceRepository,
    decode_token,
    encode_token,
)
from tracking_grpc.storage.redis_client import Connection
from tracking_grpc.storage.redis_notices import RedisDeviceNotices

log = logging.getLogger(__name__)

DEFAULT_PAGE = 100
MAX_PAGE = 1000
PAGE_BYTES = 3_000_000  # fences per page stop short of this many bytes
MAX_WATCH_IDS = 10_000
FOLLOW_TIMEOUT_S = 5.0  # longest WatchEvents waits for the event stream
GEOFENCE_STREAM = "geofence-events"  # after redis_key_prefix; :<p> per partition
FENCE_HOLDERS = "fence-holders"  # take-over notices of memberships, after the prefix
MAX_TIME_MS = 2**63 - 1  # event times are signed 64-bit integers in the stores
EVENT_ID = re.compile(r"^[0-9a-f]{1,64}$")  # events.event_id: a hex digest


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _page_size(value: int) -> int:
    if value > MAX_PAGE:
        raise InvalidArgument("page_size", f"at most {MAX_PAGE}")
    return value or DEFAULT_PAGE


def _fence_after(token: str) -> str:
    """The fence id a ListFences page token resumes after."""
    fence_id = decode_token(token)
    if not (isinstance(fence_id, str) and FENCE_ID.match(fence_id)):
        raise InvalidArgument("page_token", NOT_ISSUED)
    return fence_id


def _event_after(token: str) -> tuple[int, str]:
    """The (time_ms, event_id) a ListEvents page token resumes after."""
    value = decode_token(token)
    if not (isinstance(value, list) and len(value) == 2):
        raise InvalidArgument("page_token", NOT_ISSUED)
    time_ms, event_id = value
    # bool is an int subclass; a float (1e30) is no token this service writes
    if type(time_ms) is not int or not 0 <= time_ms <= MAX_TIME_MS:
        raise InvalidArgument("page_token", NOT_ISSUED)
    if not (isinstance(event_id, str) and EVENT_ID.match(event_id)):
        raise InvalidArgument("page_token", NOT_ISSUED)
    return time_ms, event_id


WATCH_ID_LISTS = ("fence_ids", "device_ids", "route_ids")


def _check_watch_ids(request: geofence_pb2.WatchEventsRequest) -> None:
    """At most MAX_WATCH_IDS ids in all; the list that passes the limit, counted in
    the order of WATCH_ID_LISTS, is named."""
    counted = 0
    for field in WATCH_ID_LISTS:
        counted += len(getattr(request, field))
        if counted > MAX_WATCH_IDS:
            reason = (
                f"at most {MAX_WATCH_IDS} ids in fence_ids, device_ids and "
                "route_ids together"
            )
            raise InvalidArgument(field, reason)


def _watched_fences(fence_ids: Sequence[str]) -> frozenset[str]:
    """The fences a WatchEvents call names, each a valid fence id (a blank one
    matched every event without a fence)."""
    for i, fence_id in enumerate(fence_ids):
        check_fence_id(fence_id, f"fence_ids[{i}]")
    return frozenset(fence_ids)


def _watched_routes(route_ids: Sequence[str]) -> frozenset[str]:
    """The routes a WatchEvents call names, each checked as AssignRoute checks a
    route id."""
    return frozenset(convert.check_device_ids(route_ids, "route_ids"))


class GeofenceServicer(geofence_pb2_grpc.GeofenceServicer):
    def __init__(
        self,
        app: App,
        fences: FenceRepository,
        events: EventRepository,
        processor: GeofenceProcessor,
        hub: EventWatchHub,
    ) -> None:
        self.app = app
        self.fences = fences
        self.events = events
        self.processor = processor
        self.hub = hub

    async def CreateFence(self, request, context):
        """Create a fence; INVALID_ARGUMENT names what is wrong and where."""
        caller = self.app.auth.caller(context)
        caller.require(Role.ADMIN)
        fence_id = request.fence.fence_id or uuid.uuid4().hex
        spec, repairs = await checked_fence(request, fence_id)
        stored = await self.fences.create(caller.tenant, spec, now_ms())
        self.processor.changed(caller.tenant)
        return geofence_pb2.CreateFenceResponse(
            fence=fence_message(stored), repairs=list(repairs)
        )

    async def UpdateFence(self, request, context):
        """Replace a fence's shape and settings; its id stays."""
        caller = self.app.auth.caller(context)
        caller.require(Role.ADMIN)
        fence_id = check_fence_id(request.fence.fence_id, "fence.fence_id")
        spec, repairs = await checked_fence(request, fence_id)
        stored = await self.fences.update(
            caller.tenant, spec, now_ms(), request.expected_version
        )
        self.processor.changed(caller.tenant)
        return geofence_pb2.UpdateFenceResponse(
            fence=fence_message(stored), repairs=list(repairs)
        )

    async def DeleteFence(self, request, context):
        """Delete a fence; devices inside it raise no exit."""
        caller = self.app.auth.caller(context)
        caller.require(Role.ADMIN)
        fence_id = check_fence_id(request.fence_id, "fence_id")
        await self.fences.delete(caller.tenant, fence_id)
        self.processor.changed(caller.tenant)
        return geofence_pb2.DeleteFenceResponse()

    async def GetFence(self, request, context):
        """One fence by id."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        fence_id = check_fence_id(request.fence_id, "fence_id")
        spec = await self.fences.get(caller.tenant, fence_id)
        return geofence_pb2.GetFenceResponse(fence=fence_message(spec))

    async def ListFences(self, request, context):
        """Fences by id, a page at a time, optionally only those with labels."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        size = _page_size(request.page_size)
        after = _fence_after(request.page_token) if request.page_token else ""
        check_labels(request.labels, "labels")
        found = await self.fences.list(
            caller.tenant, list(request.labels), size + 1, after
        )
        messages: list[geofence_pb2.Fence] = []
        budget = PAGE_BYTES
        for fence in found[:size]:
            message = fence_message(fence)
            budget -= message.ByteSize()
            if messages and budget < 0:
                break  # a page stays under a client's default 4 MB limit
            messages.append(message)
        more = len(found) > len(messages)
        token = encode_token(messages[-1].fence_id) if more else ""
        return geofence_pb2.ListFencesResponse(fences=messages, next_page_token=token)

    async def ImportFences(self, request, context):
        """Create or replace many fences from a GeoJSON FeatureCollection."""
        caller = self.app.auth.caller(context)
        caller.require(Role.ADMIN)
        specs, repairs = await asyncio.to_thread(
            fences_of_feature_collection, request.geojson, request.repair
        )
        result = await self.fences.import_many(
            caller.tenant, specs, now_ms(), request.replace_existing
        )
        self.processor.changed(caller.tenant)
        return geofence_pb2.ImportFencesResponse(
            fence_ids=[f.fence_id for f in result.fences],
            created=result.created,
            replaced=result.replaced,
            repairs=repairs,
        )

    async def Check(self, request, context):
        """Which fences contain a position, taking its accuracy into account."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        convert.require(request, "position", "position")
        lat, lon = request.position.lat, request.position.lon
        check_lat_lon(lat, lon, "position")
        accuracy = request.accuracy_m if request.HasField("accuracy_m") else 0.0
        if math.isnan(accuracy):
            accuracy = 0.0  # not sent, as NaN in a fix's optional values
        convert.check_accuracy(accuracy, "accuracy_m")
        found = await self.processor.check(
            caller.tenant, lat, lon, accuracy, frozenset(request.labels)
        )
        return geofence_pb2.CheckResponse(
            fences=[
                geofence_pb2.FenceCheck(
                    fence_id=c.fence_id,
                    containment=(
                        geofence_pb2.CONTAINMENT_INSIDE
                        if c.certain
                        else geofence_pb2.CONTAINMENT_PROBABLY_INSIDE
                        if c.inside
                        else geofence_pb2.CONTAINMENT_POSSIBLY_INSIDE
                    ),
                    edge_distance_m=c.edge_distance_m,
                    enters=c.enters,
                )
                for c in found
            ]
        )

    async def WatchEvents(self, request, context: grpc.aio.ServicerContext) -> None:
        """Events as they happen (geofence ones unless types asks for activity or
        route events), filtered by fence, device, type and route; ends with
        UNAUTHENTICATED when the caller's token expires, and with RESOURCE_EXHAUSTED
        when it falls behind: more events waiting than its queue holds, or a
        response left unread for write_timeout_s."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        _check_watch_ids(request)
        event_filter = EventFilter(
            caller.tenant,
            _watched_fences(request.fence_ids),
            frozenset(convert.check_device_ids(request.device_ids, "device_ids")),
            listened_types(request.types, "types", bool(request.route_ids)),
            _watched_routes(request.route_ids),
        )
        subscription = self.hub.subscribe(event_filter)
        try:
            await self._following()
            await context.send_initial_metadata(())
            while True:
                events = await caller.before_expiry(subscription.queue.get())
                if subscription.overflowed:
                    raise ResourceExhausted("the watcher fell behind; watch again")
                response = geofence_pb2.WatchEventsResponse(
                    events=event_messages(events, caller.precision_m)
                )
                del events
                timeout_s = self.app.settings.write_timeout_s
                await streams.write(
                    context, caller, response, timeout_s, streams.WATCHER_BEHIND
                )
        finally:
            self.hub.unsubscribe(subscription)

    async def _following(self) -> None:
        """Wait until the events of every process reach this one's subscribers."""
        try:
            async with asyncio.timeout(FOLLOW_TIMEOUT_S):
                await self.hub.following.wait()
        except TimeoutError:
            raise Unavailable("the event stream is unavailable") from None

    async def ListEvents(self, request, context):
        """Stored events in a time range (by fix time), oldest first; geofence ones
        unless types asks for activity or route events."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        end_ms = request.end_ms or now_ms() + 1
        if request.start_ms < 0:
            raise InvalidArgument("start_ms", "must be >= 0")
        if end_ms <= request.start_ms and not request.end_ms:
            raise InvalidArgument(
                "start_ms", "must not lie after now when end_ms is 0 (0 means now)"
            )
        if end_ms <= request.start_ms:
            raise InvalidArgument("end_ms", "must be after start_ms")
        if request.device_id:  # empty: every device
            convert.check_device_id(request.device_id, "device_id")
        if request.fence_id:  # empty: every fence
            check_fence_id(request.fence_id, "fence_id")
        if request.route_id:  # empty: every route
            convert.check_device_id(request.route_id, "route_id")
        size = _page_size(request.page_size)
        after = _event_after(request.page_token) if request.page_token else None
        found = await self.events.list(
            EventQuery(
                caller.tenant,
                request.start_ms,
                end_ms,
                device=request.device_id,
                fence_id=request.fence_id,
                route_id=request.route_id,
                types=listened_types(request.types, "types", bool(request.route_id)),
                limit=size + 1,
                after=after,
            )
        )
        page = found[:size]
        token = (
            encode_token([page[-1].time_ms, page[-1].event_id])
            if len(found) > size
            else ""
        )
        return geofence_pb2.ListEventsResponse(
            events=event_messages(page, caller.precision_m),
            next_page_token=token,
        )


def open_repositories(app: App) -> tuple[FenceRepository, EventRepository]:
    """PostGIS when a database URL is set, else the embedded SQLite file."""
    return open_stores(app.settings, app.closers)


def open_stores(
    settings: Settings, closers: list[Callable[[], Awaitable[None]]]
) -> tuple[FenceRepository, EventRepository]:
    """The fence and event repositories of ``settings``; their close goes on
    ``closers``."""
    if settings.database_url:
        from tracking_grpc.storage.postgres_fences import (
            PostgresEventRepository,
            PostgresFenceRepository,
            PostgresGeofenceDatabase,
        )

        postgres = PostgresGeofenceDatabase(
            settings.database_url, timeout_s=settings.database_timeout_s
        )
        closers.append(postgres.close)
        return PostgresFenceRepository(postgres), PostgresEventRepository(postgres)
    from tracking_grpc.storage.sqlite_fences import (
        SqliteEventRepository,
        SqliteFenceRepository,
        SqliteGeofenceDatabase,
    )

    sqlite = SqliteGeofenceDatabase.opening(
        Path(settings.data_dir) / "geofence.sqlite3"
    )
    closers.append(sqlite.close)
    return SqliteFenceRepository(sqlite), SqliteEventRepository(sqlite)


async def _erase_events(
    events: EventRepository, tenant: str, device: str
) -> dict[str, int]:
    """A device's stored events (of every type)."""
    return {"events": await events.erase_device(tenant, device)}


async def _erase_stream_entries(
    trimmer: EventStreamTrimmer, tenant: str, device: str
) -> dict[str, int]:
    """A device's entries on the event stream."""
    return {"stream_entries": await trimmer.erase_device(tenant, device)}


async def _forget_memberships(
    processor: GeofenceProcessor, tenant: str, device: str
) -> dict[str, int]:
    """Erasure: the device's memberships in this process."""
    return {"memberships": await processor.forget_device(tenant, device)}


def stream_trimmer(settings: Settings) -> EventStreamTrimmer:
    """Erasure and retention of the Redis Stream of geofence events."""
    return EventStreamTrimmer(
        Connection(settings.redis_url),
        settings.redis_key_prefix + GEOFENCE_STREAM,
        future_skew_ms=int(settings.max_future_skew_s * 1000),
        partitions=settings.event_stream_partitions,
    )


def events_purger(
    events: EventRepository, trimmer: EventStreamTrimmer | None = None
) -> Callable[[int], Awaitable[dict[str, int]]]:
    """Retention of stored geofence events and of the event stream, if there is
    one (``App.purgers``, ``tracking purge``)."""

    async def purge_events(cutoff_ms: int) -> dict[str, int]:
        purged = {"events": await events.purge_before(cutoff_ms)}
        if trimmer is not None:
            purged["stream entries"] = await trimmer.purge_before(cutoff_ms)
        return purged

    return purge_events


def _share_devices(app: App, processor: GeofenceProcessor) -> None:
    """Other server processes may evaluate the tenants' fixes: take devices over
    from them, and let go of those they take (notices on ``FENCE_HOLDERS``)."""
    notices = RedisDeviceNotices(
        Connection(app.settings.redis_url, name="tracking-fence-holders"),
        app.settings.redis_key_prefix,
        processor.released,
        stream=FENCE_HOLDERS,
        subject="fence holder",
        heard_level=logging.DEBUG,
        own=processor.announced,
    )
    processor.hear(notices.announce_many, notices.start)
    app.drains.append(processor.drain)
    app.closers.append(notices.close)


def register(server: grpc.aio.Server, app: App) -> str:
    """Add the Geofence service, its processor and its event listeners."""
    fences, events = open_repositories(app)
    lateness_ms = int(app.settings.dwell_lateness_s * 1000)
    processor = GeofenceProcessor(
        fences, events, dwell_lateness_ms=lateness_ms, history=app.history
    )
    app.fence_index = processor.using
    hub = EventWatchHub(fed_by_stream=bool(app.settings.redis_url))
    app.pipeline.add_processor(processor)
    publisher = trimmer = None
    stream = app.settings.redis_key_prefix + GEOFENCE_STREAM
    partitions = app.settings.event_stream_partitions
    if app.settings.redis_url:
        publisher = StreamPublisher(
            Connection(app.settings.redis_url), stream, events, partitions=partitions
        )
        publisher.start()
        app.drains.append(publisher.close)
        trimmer = stream_trimmer(app.settings)
        app.closers.append(trimmer.close)
        _share_devices(app, processor)
    store = EventStoreListener(
        events, app.settings.event_queue_max, publisher.wake if publisher else None
    )
    store.start()
    app.bus.add_listener(store)
    app.drains.append(store.close)
    if publisher is None:
        app.bus.add_listener(hub)
    else:  # every process's events, through the stream
        connection = Connection(app.settings.redis_url)
        feed = StreamWatchFeed(connection, stream, hub, partitions=partitions)
        feed.start()
        app.closers.append(feed.close)
    app.device_erasers.append(
        lambda tenant, device: _erase_events(events, tenant, device)
    )
    if trimmer is not None:
        app.published_erasers.append(functools.partial(_erase_stream_entries, trimmer))
    app.state_forgetters.append(
        lambda tenant, device: _forget_memberships(processor, tenant, device)
    )
    app.purgers.append(events_purger(events, trimmer))
    servicer = GeofenceServicer(app, fences, events, processor, hub)
    geofence_pb2_grpc.add_GeofenceServicer_to_server(servicer, server)
    return geofence_pb2.DESCRIPTOR.services_by_name["Geofence"].full_name


async def checked_fence(request, fence_id: str) -> tuple[FenceSpec, tuple[str, ...]]:
    """The request's fence checked (and repaired) in a worker thread: a large
    polygon's validation and measuring take long enough to stall every stream if
    done on the event loop, as an import's are not."""
    return await asyncio.to_thread(
        fence_of, request.fence, "fence", request.repair, fence_id
    )
