"""TrackSession: device streams, gateway batches and live positions."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np
from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc

from tracking_grpc import convert, streams
from tracking_grpc.app import App
from tracking_grpc.auth import Caller, Role
from tracking_grpc.core import precision
from tracking_grpc.core.fixes import FixBatch, FixRow
from tracking_grpc.core.validation import MAX_SEQ
from tracking_grpc.errors import InvalidArgument, TrackingError
from tracking_grpc.events import TrackingEvent
from tracking_grpc.fanout import Watcher, WatchFilter
from tracking_grpc.ingest import DeviceAck, IngestResult, now_ms
from tracking_grpc.observability import logs, metrics
from tracking_grpc.servicers.event_messages import event_messages
from tracking_grpc.storage.base import HistoryStore

log = logging.getLogger(__name__)

MAX_IDS = 10_000
MAX_NEARBY = 10_000
MAX_RADIUS_M = 20_037_509.0  # half the equator: every point on Earth
SNAPSHOT_CHUNK = 1_000
INFLIGHT_BATCHES = 8


def _rejections(result: IngestResult) -> list[tuple[str, int, int, str]]:
    return convert.rejections(result.batch, result.reasons)


def _ack(ack: DeviceAck, last_stored_seq: int) -> track_pb2.TrackResponse:
    # Set in place: an Ack made first and passed to TrackResponse is copied.
    response = track_pb2.TrackResponse()
    out = response.ack
    out.SetInParent()  # an ack of all zeros (an empty batch) is an ack too
    out.acked_seq = ack.acked_seq
    out.last_stored_seq = last_stored_seq
    out.stored = ack.stored
    out.duplicates = ack.duplicates
    out.rejected = ack.rejected
    if ack.rejections:
        out.rejections.extend(
            track_pb2.Rejection(seq=seq, reason=reason, detail=detail)
            for seq, reason, detail in ack.rejections
        )
    return response


def _check_batch_size(
    request: track_pb2.PublishBatchRequest, fixes: int, limit: int
) -> None:
    """A gateway call's fixes, counted as received (``fixes``), are 1 to ``limit``."""
    if fixes == 0:
        raise InvalidArgument("devices", "the batch holds no fixes")
    if fixes > limit:
        field = "columns" if request.HasField("columns") else "devices"
        raise InvalidArgument(field, f"{fixes} fixes exceed {limit}")


def _check_point(lat: float, lon: float, field: str) -> None:
    if not (math.isfinite(lat) and -90 <= lat <= 90):
        raise InvalidArgument(f"{field}.lat", "must be a finite number in [-90, 90]")
    if not (math.isfinite(lon) and -180 <= lon <= 180):
        raise InvalidArgument(f"{field}.lon", "must be a finite number in [-180, 180]")


def _check_radius(radius_m: float, field: str) -> None:
    if not (math.isfinite(radius_m) and 0 < radius_m <= MAX_RADIUS_M):
        raise InvalidArgument(field, f"must be in (0, {MAX_RADIUS_M:.0f}] metres")


def _check_ids(device_ids: Sequence[str], field: str) -> list[str]:
    if len(device_ids) > MAX_IDS:
        raise InvalidArgument(field, f"at most {MAX_IDS} device ids per call")
    return convert.check_device_ids(device_ids, field)


def watch_filter(
    request: track_pb2.WatchRequest, precision_m: float = 0.0
) -> WatchFilter:
    """The filter a Watch request asks for, validated; its area is matched against
    positions coarsened to ``precision_m`` (the caller's)."""
    devices = frozenset(_check_ids(request.device_ids, "device_ids"))
    if not request.HasField("area"):
        return WatchFilter(devices=devices)
    shape = request.area.WhichOneof("shape")
    if shape == "box":
        box = convert.check_box(request.area.box, "area.box")
        return WatchFilter(devices, box=box, precision_m=precision_m)
    if shape == "circle":
        circle = request.area.circle
        convert.require(circle, "center", "area.circle.center")
        _check_point(circle.center.lat, circle.center.lon, "area.circle.center")
        _check_radius(circle.radius_m, "area.circle.radius_m")
        return WatchFilter(
            devices,
            circle=(circle.center.lat, circle.center.lon, circle.radius_m),
            precision_m=precision_m,
        )
    raise InvalidArgument("area", "set box or circle")


class TrackSessionServicer(track_pb2_grpc.TrackSessionServicer):
    """Device sessions, gateway batches, watches and live reads."""

    def __init__(self, app: App) -> None:
        self.app = app
        # Streams that asked for their device's events: (tenant, device) -> queues.
        self._event_queues: dict[tuple[str, str], set[asyncio.Queue]] = {}
        self._states = _StateLoader(app.history)
        app.bus.add_listener(self._route_events)

    async def _route_events(self, events: Sequence[TrackingEvent]) -> None:
        for event in events:
            for queue in self._event_queues.get((event.tenant, event.device), ()):
                if queue.full():
                    queue.get_nowait()  # a stalled stream keeps the newest events
                    metrics.stream_events_dropped(1)
                queue.put_nowait(event)

    async def Track(
        self,
        request_iterator: AsyncIterator[track_pb2.TrackRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """A device session: hello, then fix batches, answered by acks and events."""
        caller = self.app.auth.caller(context)
        caller.require_writer()
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("message") != "hello":
            raise InvalidArgument(
                "hello", "the first message of a stream must be hello"
            )
        device_id = check_hello(first.hello)
        logs.bind(device=device_id)
        caller.require_device(device_id)
        last_stored = await self._states.last_stored_seq(caller.tenant, device_id)
        started = track_pb2.SessionStarted(
            device_id=device_id, last_stored_seq=last_stored, server_time_ms=now_ms()
        )
        await streams.write(
            context,
            caller,
            track_pb2.TrackResponse(started=started),
            self.app.settings.write_timeout_s,
            streams.DEVICE_BEHIND,
        )
        log.debug("track stream opened for %s/%s", caller.tenant, device_id)
        want_events = first.hello.want_events
        del first, started  # the stream outlives them: do not keep them alive
        session = _Session(
            self.app, caller, device_id, last_stored, context, want_events
        )
        key = (caller.tenant, device_id)
        if session.events is not None:
            self._event_queues.setdefault(key, set()).add(session.events)
        try:
            await session.run(request_iterator)
        finally:
            queues = self._event_queues.get(key)
            if queues is not None and session.events is not None:
                queues.discard(session.events)
                if not queues:
                    del self._event_queues[key]
            log.debug("track stream closed for %s/%s", caller.tenant, device_id)

    async def PublishBatch(
        self, request: track_pb2.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> track_pb2.PublishBatchResponse:
        """Store fixes of many devices; answers once they are durable. While
        storage is behind, waits as received, or is refused with RESOURCE_EXHAUSTED
        and nothing stored (Admission.admit_batch)."""
        caller = self.app.auth.caller(context)
        caller.require_writer()
        fixes = len(request.columns.seq) + sum(len(d.fixes) for d in request.devices)
        _check_batch_size(request, fixes, self.app.settings.max_batch_fixes)
        await self.app.pipeline.admission.admit_batch(fixes)
        batches = []
        for i, device in enumerate(request.devices):
            field = f"devices[{i}].device_id"
            device_id = convert.check_device_id(device.device_id, field)
            batches.append(
                convert.fixes_to_batch(caller.tenant, device_id, device.fixes)
            )
        if request.HasField("columns"):
            batches.append(convert.columns_to_batch(caller.tenant, request.columns))
        batch = FixBatch.concat(batches) if batches else FixBatch.empty(caller.tenant)
        if caller.role == Role.DEVICE:
            for device_id in set(batch.device.tolist()):
                caller.require_device(device_id)
        result = await self.app.pipeline.ingest(batch)
        return track_pb2.PublishBatchResponse(
            stored=result.stored,
            duplicates=result.duplicates,
            rejected=result.rejected,
            rejections=[
                track_pb2.BatchRejection(
                    device_id=device,
                    seq=seq,
                    reason=reason,
                    detail=detail,
                )
                for device, seq, reason, detail in _rejections(result)
            ],
        )

    async def Watch(
        self, request: track_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """A snapshot of matching live positions, then every update, coalesced;
        ends with UNAUTHENTICATED when the caller's token expires, and with
        RESOURCE_EXHAUSTED when the client leaves a response unread for
        write_timeout_s (see tracking_grpc.streams)."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        # Without a snapshot, a catch-up after an outage (WatchHub.catch_up) brings
        # only positions received from now on.
        since_ms = now_ms() if request.skip_snapshot else 0
        watch = watch_filter(request, caller.precision_m)
        watcher = Watcher(caller.tenant, watch, since_ms)
        # Before the snapshot read: see WatchHub.add and redis_broker's ordering.
        await self.app.hub.add(watcher)
        try:
            # Headers on their own: the first response then waits for the client's
            # window (and times out) like every other.
            await context.send_initial_metadata(())
            if not request.skip_snapshot:
                await self._write_snapshot(context, caller, watcher)
            while True:
                updates = await caller.before_expiry(watcher.next_updates())
                updates = precision.coarsen(updates, caller.precision_m)
                response = track_pb2.WatchResponse(positions=convert.positions(updates))
                del updates  # a stalled write holds the response only
                await self._write_watch(context, caller, response)
        finally:
            self.app.hub.remove(watcher)

    async def _write_snapshot(
        self, context: grpc.aio.ServicerContext, caller: Caller, watcher: Watcher
    ) -> None:
        """The matching live positions, oldest fix first, SNAPSHOT_CHUNK a message;
        each message is made when the one before it has been taken."""
        snapshot = await caller.before_expiry(self.app.live.snapshot(watcher.tenant))
        snapshot = snapshot.take(watcher.filter.mask(snapshot))
        snapshot = snapshot.take(np.argsort(snapshot.time_ms, kind="stable"))
        watcher.mark_sent(snapshot)
        snapshot = precision.coarsen(snapshot, caller.precision_m)
        for start in range(0, len(snapshot), SNAPSHOT_CHUNK):
            rows = np.arange(start, min(start + SNAPSHOT_CHUNK, len(snapshot)))
            positions = convert.positions(snapshot.take(rows))
            response = track_pb2.WatchResponse(snapshot=True, positions=positions)
            del positions
            await self._write_watch(context, caller, response)
        del snapshot
        done = track_pb2.WatchResponse(snapshot=True, snapshot_done=True)
        await self._write_watch(context, caller, done)

    async def _write_watch(
        self,
        context: grpc.aio.ServicerContext,
        caller: Caller,
        response: track_pb2.WatchResponse,
    ) -> None:
        timeout_s = self.app.settings.write_timeout_s
        await streams.write(
            context, caller, response, timeout_s, streams.WATCHER_BEHIND
        )

    async def GetLastPositions(
        self,
        request: track_pb2.GetLastPositionsRequest,
        context: grpc.aio.ServicerContext,
    ) -> track_pb2.GetLastPositionsResponse:
        """The newest position of each named device, in request order."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        device_ids = _check_ids(request.device_ids, "device_ids")
        if not device_ids:
            raise InvalidArgument("device_ids", "name at least one device")
        await self.app.pipeline.live_writer.settled(caller.tenant)
        found = await self.app.live.get(caller.tenant, device_ids)
        found = precision.coarsen(found, caller.precision_m)
        by_device = dict(
            zip(found.device.tolist(), convert.positions(found), strict=True)
        )
        return track_pb2.GetLastPositionsResponse(
            positions=[by_device[d] for d in device_ids if d in by_device],
            missing_device_ids=[d for d in device_ids if d not in by_device],
        )

    async def Nearby(
        self, request: track_pb2.NearbyRequest, context: grpc.aio.ServicerContext
    ) -> track_pb2.NearbyResponse:
        """Devices within a radius of a point, nearest first."""
        caller = self.app.auth.caller(context)
        caller.require(Role.VIEWER)
        if not request.HasField("center"):
            raise InvalidArgument("center", "is required")
        _check_point(request.center.lat, request.center.lon, "center")
        _check_radius(request.radius_m, "radius_m")
        limit = request.limit or 100
        if limit > MAX_NEARBY:
            raise InvalidArgument("limit", f"at most {MAX_NEARBY}")
        center = request.center
        await self.app.pipeline.live_writer.settled(caller.tenant)
        if caller.precision_m > 0:
            found, distance = await self._nearby_coarse(caller, request, limit)
        else:
            found, distance = await self.app.live.nearby(
                caller.tenant, center.lat, center.lon, request.radius_m, limit
            )
        positions = convert.positions(found)
        return track_pb2.NearbyResponse(
            devices=[
                track_pb2.NearbyDevice(position=p, distance_m=d)
                for p, d in zip(positions, distance.tolist(), strict=True)
            ]
        )

    async def _nearby_coarse(
        self, caller: Caller, request: track_pb2.NearbyRequest, limit: int
    ) -> tuple[FixBatch, np.ndarray]:
        """Nearby for a caller limited to a precision: measured from cell centres
        (core.precision.nearest), among the fixes within the radius grown by the
        farthest a cell centre lies from its fix."""
        center = request.center
        reach_m = request.radius_m + precision.slack_m(caller.precision_m)
        found, _ = await self.app.live.nearby(
            caller.tenant,
            center.lat,
            center.lon,
            min(reach_m, MAX_RADIUS_M),
            MAX_NEARBY,
        )
        return precision.nearest(
            found,
            center.lat,
            center.lon,
            request.radius_m,
            limit,
            caller.precision_m,
        )


class _StateLoader:
    """Answers stream opens with one ``device_states`` call per batch of opens.

    A stream open needs its device's last stored sequence number. One query per open
    is a round trip each: 10k devices reconnecting at once exhausted the PostgreSQL
    pool (UNAVAILABLE after 5 s). Opens that arrive while a query runs wait for the
    next one, which asks for all of them.
    """

    def __init__(self, history: HistoryStore) -> None:
        self.history = history
        self._waiting: dict[str, dict[str, list[asyncio.Future[int]]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def last_stored_seq(self, tenant: str, device_id: str) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, {}).setdefault(device_id, []).append(future)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="device-states")
        return await future

    async def _run(self) -> None:
        try:
            while self._waiting:
                waiting, self._waiting = self._waiting, {}
                await asyncio.gather(
                    *(
                        self._load(tenant, devices)
                        for tenant, devices in waiting.items()
                    )
                )
        finally:
            self._task = None

    async def _load(
        self, tenant: str, devices: dict[str, list[asyncio.Future[int]]]
    ) -> None:
        try:
            states = await self.history.device_states(tenant, list(devices))
        except Exception as exc:
            for futures in devices.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            return
        for device_id, futures in devices.items():
            state = states.get(device_id)
            for future in futures:
                if not future.done():
                    future.set_result(state.last_stored_seq if state else 0)


class _Session:
    """One Track stream: reads batches, stores them in order, writes acks and events.

    The handler's own task reads. An ack writer task exists only while acks are
    outstanding (at one fix every few seconds, a few milliseconds out of every few
    seconds): at 10k open streams, long-lived per-stream tasks and queues were a
    tenth of the memory and most of the objects the garbage collector walks.
    """

    def __init__(
        self,
        app: App,
        caller: Caller,
        device_id: str,
        last_stored: int,
        context: grpc.aio.ServicerContext,
        want_events: bool = False,
    ) -> None:
        self.app = app
        self.caller = caller
        self.device_id = device_id
        self.last_stored = last_stored
        self.context = context
        # A list, not a deque: at most INFLIGHT_BATCHES long, and an empty deque
        # costs 760 bytes per open stream.
        self._unacked: list[asyncio.Future[DeviceAck]] = []
        # Set by the ack writer when it has written an ack the reader waits for.
        self._room: asyncio.Future[None] | None = None
        self._acking: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._reader: asyncio.Task | None = None
        # A stream that wants no events has one writer (acks) and needs neither a
        # queue nor a lock.
        self.events: asyncio.Queue[TrackingEvent] | None = None
        self._write_lock: asyncio.Lock | None = None
        if want_events:
            self.events = asyncio.Queue(maxsize=1_000)
            self._write_lock = asyncio.Lock()

    async def _write(self, response: track_pb2.TrackResponse) -> None:
        if self._write_lock is None:
            await self._write_now(response)
            return
        async with self._write_lock:
            await self._write_now(response)

    async def _write_now(self, response: track_pb2.TrackResponse) -> None:
        timeout_s = self.app.settings.write_timeout_s
        await streams.write(
            self.context, self.caller, response, timeout_s, streams.DEVICE_BEHIND
        )

    async def run(self, requests: AsyncIterator[track_pb2.TrackRequest]) -> None:
        """Reads until the client half-closes (or the caller's token expires), with
        up to INFLIGHT_BATCHES batches awaiting their acks; acks go out in batch
        order; then the last acks. A message (or the expiry) that ends the stream
        with an error ends it after the acks of the batches before it."""
        reader = self._reader = asyncio.current_task()
        assert reader is not None
        events = None
        if self.events is not None:
            events = asyncio.create_task(self._write_events(self.events))
        try:
            try:
                # An idle stream would outlive its token (and hear events): the
                # expiry ends it by a timer, not only at the next batch.
                await self.caller.before_expiry(self._read(requests))
            except TrackingError:
                # A bad message ends the stream, but the batches before it are
                # stored (or will be): their acks go out before the error.
                await self._acks_written()
                raise
            await self._acks_written()
            self._raise_failure()
        except asyncio.CancelledError:
            # The ack writer cancels the reader when an ack cannot be given.
            if self._failure is None or reader.uncancel() > 0:
                raise
            self._raise_failure()
        finally:
            for task in (self._acking, events):
                if task is not None:
                    task.cancel()
            for pending in self._unacked:
                # Submitted fixes are still stored; only their ack is lost.
                pending.add_done_callback(_consume)

    async def _acks_written(self) -> None:
        """Wait until every submitted batch is acked (or acking has failed)."""
        if self._acking is not None:
            await asyncio.shield(self._acking)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _read(self, requests: AsyncIterator[track_pb2.TrackRequest]) -> None:
        pipeline = self.app.pipeline
        admission = pipeline.admission
        submit = pipeline.submit_rows
        tenant = self.caller.tenant
        device_id = self.device_id
        unacked = self._unacked
        async for request in requests:
            if request.WhichOneof("message") == "batch":
                rows = self._batch_rows(request.batch.fixes)
            else:
                self._other(request)
                continue
            if admission.congested:
                await admission.wait_for_space()
            while len(unacked) >= INFLIGHT_BATCHES:
                # Until an ack is written: a device that reads no acks is not read
                # ahead of them (gRPC's flow control keeps its batches in the device).
                self._room = asyncio.get_running_loop().create_future()
                await self._room
            unacked.append(submit(tenant, device_id, rows))
            if self._acking is None:
                self._acking = asyncio.create_task(self._write_acks())

    def _batch_rows(self, fixes: Sequence[common_pb2.Fix]) -> list[FixRow]:
        limit = self.app.settings.max_batch_fixes
        if len(fixes) > limit:
            raise InvalidArgument(
                "batch.fixes", f"{len(fixes)} fixes exceed the maximum of {limit}"
            )
        if self.caller.expires_at is not None:
            self.caller.check_not_expired()
        # An empty batch is acknowledged too, so acks pair with batches one to one.
        return convert.fix_rows(fixes)

    def _other(self, request: track_pb2.TrackRequest) -> None:
        """A message that is not a batch: a repeated hello of this device passes."""
        kind = request.WhichOneof("message")
        if kind == "hello":
            if check_hello(request.hello) != self.device_id:
                raise InvalidArgument(
                    "hello.device_id", "a stream carries one device; open another"
                )
            return
        raise InvalidArgument("message", "set hello or batch")

    async def _write_acks(self) -> None:
        """Writes acks while batches await them; ends when none does."""
        unacked = self._unacked
        try:
            while unacked:
                ack = await unacked[0]
                if ack.newest_stored_seq > self.last_stored:
                    self.last_stored = ack.newest_stored_seq
                response = _ack(ack, self.last_stored)
                if self._write_lock is None:  # no events: one coroutine less
                    await streams.write(
                        self.context,
                        self.caller,
                        response,
                        self.app.settings.write_timeout_s,
                        streams.DEVICE_BEHIND,
                    )
                else:
                    await self._write(response)
                del unacked[0]
                if self._room is not None:
                    self._room.set_result(None)
                    self._room = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Storage gave up (shutting down), the device reads no acks or the call
            # is gone: end the stream.
            self._fail(exc)
        finally:
            self._acking = None

    def _fail(self, exc: Exception) -> None:
        """End the stream with ``exc``: the reader is cancelled, and raises it."""
        if self._failure is None:
            self._failure = exc
            if self._reader is not None:
                self._reader.cancel()

    async def _write_events(self, events: asyncio.Queue[TrackingEvent]) -> None:
        try:
            while True:
                event = await events.get()
                (message,) = event_messages([event], self.caller.precision_m)
                await self._write(track_pb2.TrackResponse(event=message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(exc)


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def register(server: grpc.aio.Server, app: App) -> str:
    track_pb2_grpc.add_TrackSessionServicer_to_server(TrackSessionServicer(app), server)
    return track_pb2.DESCRIPTOR.services_by_name["TrackSession"].full_name


def check_hello(hello: track_pb2.Hello) -> str:
    """The hello's device id once its fields are valid; INVALID_ARGUMENT naming the
    first bad one otherwise."""
    device_id = convert.check_device_id(hello.device_id, "hello.device_id")
    if hello.HasField("resume_from_seq") and hello.resume_from_seq > MAX_SEQ:
        raise InvalidArgument(
            "hello.resume_from_seq",
            f"{hello.resume_from_seq} exceeds the largest sequence number {MAX_SEQ}",
        )
    return device_id
