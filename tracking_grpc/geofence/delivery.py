"""Where events go after the bus: the event store, WatchEvents subscribers and a
Redis Stream.

The store and the watch hub are event-bus listeners that take every event the bus
carries: geofence, activity and route events alike (each WatchEvents call filters
by type; with no types it gets the geofence events). The Redis publisher sends what
the event store holds unpublished (an outbox), so an event once stored reaches the
stream at least once, across outages and restarts; consumers read it with consumer
groups (XREADGROUP, XACK) and de-duplicate by ``event_id``. Both the publisher and
the feed connect on first need through ``redis_client.Connection``, standalone or
cluster. The stream is one key, or one per partition of the fleet
(``partitions.EventStreams``: a device's events on one of them, in order), so that
on a cluster the partitions' keys spread over the nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tracking_grpc.events import EventType, TrackingEvent
from tracking_grpc.geofence.partitions import EventStreams
from tracking_grpc.observability import metrics
from tracking_grpc.storage.fences import (
    EventRepository,
    activity_of_text,
    activity_text,
)
from tracking_grpc.storage.redis_client import Connection, unavailable

log = logging.getLogger(__name__)

WATCH_QUEUE = 10_000
STORE_CHUNK = 1_000  # events per write: preparing one holds the event loop
STREAM_MAXLEN = 1_000_000
RETRY_S = (0.1, 0.5, 2.0, 5.0)


class EventStoreListener:
    """Stores events for ListEvents, in batches, off the bus's path.

    The listener queues; a task writes what has gathered, a chunk per transaction,
    and retries while the store is unavailable. At most ``max_queued`` events wait:
    beyond, the bus call waits for room, and with it the event processors; the
    stored fixes they have not yet had then hold the group commits back until
    ``max_pending_fixes`` pauses the device streams. Acks still mean stored, and no
    accepted fix is dropped.

    A stop lets it store what is queued until the stop's deadline, where a write
    still running is cut off and waiting emitters are let go (``release``); what
    is left then is logged and lost.
    """

    def __init__(
        self,
        events: EventRepository,
        max_queued: int,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self.events = events
        self.max_queued = max_queued
        self.on_stored = on_stored
        self._pending: list[TrackingEvent] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()  # set while an emitter need not wait
        self._room.set()
        self._cut = asyncio.Event()  # the stop's deadline has passed
        self._task: asyncio.Task[None] | None = None
        self._writing: asyncio.Task[int] | None = None
        self._chunk = 0  # events of the write under way (the first queued)
        self._closing = False
        self._released = False  # emitters no longer wait for room
        self._full = False  # the queue was full and has not drained since
        self._dropped = 0  # events that found no room once released

    @property
    def queued(self) -> int:
        """Events waiting to be stored, the chunk being written included."""
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-store")

    async def __call__(self, events: Sequence[TrackingEvent]) -> None:
        """Queue ``events``, waiting for room while ``max_queued`` are queued."""
        start = 0
        while start < len(events):
            room = self.max_queued - len(self._pending)
            if room > 0:
                self._queue(events[start : start + room])
                start += room
            elif self._released:
                self._dropped += len(events) - start
                return
            else:
                self._note_full()
                await self._room.wait()

    async def flushed(self) -> None:
        """Wait until every queued event is stored."""
        await self._idle.wait()

    async def forget_device(self, tenant: str, device: str) -> None:
        """Erasure: drop the queued events of ``device`` of ``tenant``; returns
        once no write of any of them is under way (the caller then erases those
        stored). A write of some that fails is not retried with them."""
        while True:
            writing = self._writing
            start = self._chunk if writing is not None else 0
            kept = [
                event
                for event in self._pending[start:]
                if event.device != device or event.tenant != tenant
            ]
            self._pending[start:] = kept
            metrics.event_store_queued(len(self._pending))
            if len(self._pending) < self.max_queued:
                self._room.set()
            in_flight = self._pending[:start]
            if writing is None or not any(
                event.device == device and event.tenant == tenant for event in in_flight
            ):
                return
            await asyncio.wait({writing})  # stored or failed: then dropped

    def release(self) -> None:
        """Let waiting emitters go, and make none wait again (the stop's deadline):
        events that find no room from now on are counted as not stored."""
        self._released = True
        self._room.set()

    def _queue(self, events: Sequence[TrackingEvent]) -> None:
        self._pending.extend(events)
        if len(self._pending) >= self.max_queued and not self._released:
            self._room.clear()
        metrics.event_store_queued(len(self._pending))
        self._idle.clear()
        self._wake.set()

    def _stored(self, count: int) -> None:
        del self._pending[:count]
        metrics.event_store_queued(len(self._pending))
        if len(self._pending) < self.max_queued:
            self._room.set()
        if self._full and not self._pending:
            self._full = False
            log.warning("event store queue drained: every queued event is stored")

    def _note_full(self) -> None:
        if not self._full:
            self._full = True
            log.warning(
                "event store queue full (%d events): event processing waits for the "
                "event store, and device streams pause once max_pending_fixes "
                "stored fixes wait for event processing",
                len(self._pending),
            )

    async def _run(self) -> None:
        try:
            await self._store_queued()
        finally:
            self.release()  # nothing stores what an emitter would wait to queue

    async def _store_queued(self) -> None:
        failures = 0
        while not (self._closing and not self._pending):
            if self._cut.is_set():
                self._log_unstored(cut_write=0)
                return
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            chunk = self._pending[:STORE_CHUNK]
            try:
                await self._write_chunk(chunk)
            except _WriteCut:
                self._log_unstored(cut_write=len(chunk))
                return
            except Exception as exc:
                failures += 1
                log.warning("storing %d events failed (%s); retrying", len(chunk), exc)
                if self._closing and failures > len(RETRY_S):
                    log.error(
                        "%d events not stored at shutdown",
                        len(self._pending) + self._dropped,
                    )
                    return
                delay = RETRY_S[min(failures, len(RETRY_S)) - 1]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cut.wait(), delay)
                continue
            failures = 0
            self._stored(len(chunk))
            if self.on_stored is not None:
                self.on_stored()
        self._idle.set()

    async def _write_chunk(self, chunk: list[TrackingEvent]) -> None:
        """Store ``chunk``; raises ``_WriteCut`` when the stop's deadline cut the
        write off (held by a lock, a slow database)."""
        self._writing = asyncio.create_task(self.events.add(chunk))
        self._chunk = len(chunk)
        try:
            await self._writing
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if not self._cut.is_set() or (this is not None and this.cancelling()):
                raise  # the task itself was cancelled, not the write by the cut
            raise _WriteCut from None
        finally:
            self._writing, self._chunk = None, 0

    def _log_unstored(self, cut_write: int) -> None:
        """At the stop's deadline: how many events are left, ``cut_write`` of them
        in a write cut off then."""
        cut = ""
        if cut_write:
            cut = f", and a write of {cut_write} more was cut off (it may have stored"
            cut += " them)"
        log.warning(
            "%d events not stored at the stop deadline%s: ListEvents and the event "
            "stream will not have them",
            len(self._pending) + self._dropped - cut_write,
            cut,
        )

    async def close(self, deadline: float | None = None) -> None:
        """Store what is queued, until ``deadline`` (event loop time) if given."""
        self._closing = True
        self._wake.set()
        await _until(self._task, deadline, self._cut_off)

    def _cut_off(self) -> None:
        self._cut.set()
        self._wake.set()
        self.release()
        if self._writing is not None:
            self._writing.cancel()


class _WriteCut(Exception):
    """The stop's deadline cut a write of events off."""


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Empty sets match everything."""

    tenant: str
    fences: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()
    types: frozenset[EventType] = frozenset()
    routes: frozenset[str] = frozenset()

    def matches(self, event: TrackingEvent) -> bool:
        return (
            event.tenant == self.tenant
            and (not self.fences or event.fence_id in self.fences)
            and (not self.devices or event.device in self.devices)
            and (not self.types or event.type in self.types)
            and (not self.routes or event.route_id in self.routes)
        )


@dataclass(eq=False)
class EventSubscription:
    """One WatchEvents call: matching events wait in a bounded queue."""

    filter: EventFilter
    queue: asyncio.Queue[list[TrackingEvent]] = field(
        default_factory=lambda: asyncio.Queue(WATCH_QUEUE)
    )
    overflowed: bool = False


class EventWatchHub:
    """Delivers events to WatchEvents subscribers of this process.

    Fed directly by the event bus, or by a ``StreamWatchFeed``, which follows the
    stream only while the hub has subscribers and says so in ``following``.
    """

    def __init__(self, fed_by_stream: bool = False) -> None:
        self._subscriptions: set[EventSubscription] = set()
        self.watched = asyncio.Event()
        self.following = asyncio.Event()
        if not fed_by_stream:
            self.following.set()

    def subscribe(self, event_filter: EventFilter) -> EventSubscription:
        subscription = EventSubscription(event_filter)
        self._subscriptions.add(subscription)
        self.watched.set()
        return subscription

    def unsubscribe(self, subscription: EventSubscription) -> None:
        self._subscriptions.discard(subscription)
        if not self._subscriptions:
            self.watched.clear()

    async def __call__(self, events: Sequence[TrackingEvent]) -> None:
        for subscription in list(self._subscriptions):
            matching = [e for e in events if subscription.filter.matches(e)]
            if not matching:
                continue
            try:
                subscription.queue.put_nowait(matching)
            except asyncio.QueueFull:
                subscription.overflowed = True
                self.unsubscribe(subscription)
                with contextlib.suppress(asyncio.QueueEmpty):
                    subscription.queue.get_nowait()
                subscription.queue.put_nowait([])  # wakes the stream to end it


def stream_fields(event: TrackingEvent) -> dict[str, str]:
    """One stream entry: every field of the event as text (``activity`` is the
    ActivityDetail as JSON, empty for an event without one)."""
    return {
        "event_id": event.event_id,
        "tenant": event.tenant,
        "device_id": event.device,
        "type": event.type.name,
        "fence_id": event.fence_id,
        "time_ms": str(event.time_ms),
        "lat": repr(event.lat),
        "lon": repr(event.lon),
        "fix_seq": str(event.fix_seq),
        "created_ms": str(event.created_ms),
        "attributes": json.dumps(event.attributes, sort_keys=True),
        "route_id": event.route_id,
        "activity": activity_text(event.activity) or "",
    }


def event_of_stream(entry: dict[str, str]) -> TrackingEvent:
    """The event of a stream entry (for consumers and tests); entries written before
    activity and route events were published lack their two fields."""
    return TrackingEvent(
        event_id=entry["event_id"],
        tenant=entry["tenant"],
        device=entry["device_id"],
        type=EventType[entry["type"]],
        time_ms=int(entry["time_ms"]),
        lat=float(entry["lat"]),
        lon=float(entry["lon"]),
        fix_seq=int(entry["fix_seq"]),
        created_ms=int(entry["created_ms"]),
        fence_id=entry["fence_id"],
        route_id=entry.get("route_id", ""),
        attributes=json.loads(entry["attributes"]),
        activity=activity_of_text(entry.get("activity")),
    )


class StreamPublisher:
    """Appends stored events to a Redis Stream: the event store is the outbox.

    Events marked unpublished in the store are appended (XADD) and then marked; what a
    crash or a Redis outage leaves unpublished goes out when the publisher runs again.
    An event may so be appended twice, never lost once stored. A stop publishes
    until its deadline and leaves the rest for the next start. With ``partitions``
    above 1 each event goes to its device's partition of ``stream``.
    """

    def __init__(
        self,
        connection: Connection,
        stream: str,
        events: EventRepository,
        poll_s: float = 1.0,
        partitions: int = 1,
    ) -> None:
        self.connection = connection
        self.streams = EventStreams(stream, partitions)
        self.events = events
        self.poll_s = poll_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._cut = False  # the stop's deadline has passed

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="geofence-stream")

    def wake(self) -> None:
        """New events were stored."""
        self._wake.set()

    async def _run(self) -> None:
        failures = 0
        while True:
            if self._cut:
                log.info(
                    "stop deadline: stored events not yet on the event stream are "
                    "published after the next start"
                )
                return
            self._wake.clear()
            try:
                chunk = await self.events.unpublished(500)
                if chunk:
                    await self._publish(chunk)
                    await self.events.mark_published(chunk)
                    failures = 0
                    continue
            except Exception as exc:
                failures += 1
                if self._closing and failures > 2:
                    log.error("events left unpublished at shutdown: %s", exc)
                    return
                delay = RETRY_S[min(failures, len(RETRY_S)) - 1]
                log.warning("publishing events failed (%s); retry in %ss", exc, delay)
                await asyncio.sleep(delay)
                continue
            if self._closing:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def _publish(self, events: list[TrackingEvent]) -> None:
        """Append ``events`` in one pipeline; on a cluster it sends each node the
        appends to its partitions (not a transaction: a retry may append some
        twice)."""
        client = await self.connection.get()
        with unavailable("the event stream"):
            async with client.pipeline(transaction=False) as pipe:
                for event in events:
                    fields: dict[Any, Any] = stream_fields(event)
                    pipe.xadd(
                        self.streams.key_of(event.tenant, event.device),
                        fields,
                        maxlen=STREAM_MAXLEN,
                        approximate=True,
                    )
                await pipe.execute()

    async def close(self, deadline: float | None = None) -> None:
        """Publish what the store holds unpublished, until ``deadline`` (event loop
        time) if given; then close the connection."""
        self._closing = True
        self._wake.set()
        await _until(self._task, deadline, self._cut_off)
        await self.connection.close()

    def _cut_off(self) -> None:
        self._cut = True
        self._wake.set()


class StreamWatchFeed:
    """Feeds a watch hub from the Redis Stream, so that WatchEvents on any server
    process sees the events every process raises. It reads only while the hub has
    subscribers (a process nobody watches events on reads none of the fleet's):
    when the first arrives it notes the last entry of each partition's stream,
    sets ``following``, and reads every entry after those until the last
    subscriber has gone.

    Each partition has a reader of its own (one blocking XREAD, so one connection,
    each): a cluster cannot read keys of several slots in one call. A device's
    events come in order; events of devices on different partitions may come in
    another order than they were appended.
    """

    def __init__(
        self,
        connection: Connection,
        stream: str,
        hub: EventWatchHub,
        partitions: int = 1,
    ) -> None:
        self.connection = connection
        self.streams = EventStreams(stream, partitions)
        self.hub = hub
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="geofence-watch-feed")

    async def _run(self) -> None:
        while True:
            self.hub.following.clear()
            await self.hub.watched.wait()
            newest = await self._newest()
            if newest is None:
                continue  # the subscribers left before the streams could be read
            self.hub.following.set()
            async with asyncio.TaskGroup() as readers:
                for key, last in newest.items():
                    readers.create_task(self._follow(key, last))

    async def _newest(self) -> dict[str, str] | None:
        """The id of each partition's last entry ("0-0" for an empty one), tried
        until Redis answers; None if the hub is no longer watched meanwhile."""
        failures = 0
        while self.hub.watched.is_set():
            try:
                client = await self.connection.get()
                with unavailable("the event stream"):
                    keys = self.streams.keys()
                    found: list[Any] = await asyncio.gather(
                        *(client.xrevrange(key, count=1) for key in keys)
                    )
                return {
                    key: _text(last[0][0]) if last else "0-0"
                    for key, last in zip(keys, found, strict=True)
                }
            except Exception as exc:
                failures += 1
                await self._pause(failures, exc)
        return None

    async def _follow(self, key: str, last: str) -> None:
        """Hand the hub the entries of ``key`` after ``last`` while it is watched."""
        failures = 0
        while self.hub.watched.is_set():
            try:
                client = await self.connection.get()
                with unavailable("the event stream"):
                    found: Any = await client.xread({key: last}, block=1000, count=1000)
            except Exception as exc:
                failures += 1
                await self._pause(failures, exc)
                continue
            failures = 0
            for _, entries in found or []:
                if entries:
                    last = _text(entries[-1][0])
                    await self.hub([_event(f) for _, f in entries])

    async def _pause(self, failures: int, exc: Exception) -> None:
        delay = RETRY_S[min(failures, len(RETRY_S)) - 1]
        log.warning("reading the event stream failed (%s); retry in %ss", exc, delay)
        await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.connection.close()


async def _until(
    task: asyncio.Task[None] | None, deadline: float | None, cut_off: Callable[[], None]
) -> None:
    """Wait for ``task`` to end, calling ``cut_off`` at ``deadline`` if it has not."""
    if task is None:
        return
    cut = None
    if deadline is not None:
        cut = asyncio.get_running_loop().call_at(deadline, cut_off)
    try:
        await task
    finally:
        if cut is not None:
            cut.cancel()


def _event(entry: dict) -> TrackingEvent:
    return event_of_stream({_text(k): _text(v) for k, v in entry.items()})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
