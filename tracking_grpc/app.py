"""The application: settings, backends, ingest pipeline and buses, wired once."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tracking_grpc import erasure
from tracking_grpc.activity.checkpoint import CheckpointWriter
from tracking_grpc.activity.params import ActivityConfig
from tracking_grpc.activity.processor import ActivityProcessor
from tracking_grpc.auth import Authenticator
from tracking_grpc.config import Settings
from tracking_grpc.errors import Unavailable
from tracking_grpc.events import EventBus
from tracking_grpc.fanout import WatchHub
from tracking_grpc.ingest import IngestPipeline
from tracking_grpc.live_writer import live_is_shared
from tracking_grpc.storage import factory
from tracking_grpc.storage.base import Broker, HistoryStore, LiveStore
from tracking_grpc.storage.live_repair import LiveRepairer, rebuild_live

if TYPE_CHECKING:
    from tracking_grpc.geofence.index import FenceIndex

log = logging.getLogger(__name__)

# Erases one device (tenant, device) from what a service keeps; returns counts by
# field of ``erasure.Erased``.
DeviceEraser = Callable[[str, str], Awaitable[dict[str, int]]]


@dataclass
class App:
    """Everything a servicer needs; built by :func:`open_app`, closed by ``close``."""

    settings: Settings
    history: HistoryStore
    live: LiveStore
    broker: Broker
    bus: EventBus
    auth: Authenticator
    pipeline: IngestPipeline
    hub: WatchHub
    activity: ActivityProcessor
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # What has a backlog to finish before the closers run (events to store and to
    # publish), given the stop's deadline (event loop time, or None: no limit).
    drains: list[Callable[[float | None], Awaitable[None]]] = field(
        default_factory=list
    )
    # The tenant's current fence index, kept by the geofence processor (rebuilt off
    # the event loop when the tenant's fences change), held while it is queried;
    # set by the Geofence service.
    fence_index: Callable[[str], AbstractAsyncContextManager[FenceIndex]] | None = None
    # Services registered but unable to serve (Route without a routing dataset):
    # health reports them NOT_SERVING while the rest of the server serves.
    not_ready: set[str] = field(default_factory=set)
    # What else stores a device's data (added by the Geofence service: its stored
    # events); run with the processors paused, after the in-process state is
    # forgotten, so that no state is reloaded from it (memberships from events).
    device_erasers: list[DeviceEraser] = field(default_factory=list)
    # What a device's data was published to (the Redis Stream of events): erased
    # last, with the processors running (a stream walk takes long).
    published_erasers: list[DeviceEraser] = field(default_factory=list)
    # What keeps a device's state in this process (added by the Geofence and Route
    # services), besides the activity processor.
    state_forgetters: list[DeviceEraser] = field(default_factory=list)
    # Tells the other server processes of an erasure (None: this is the only one).
    announce_erasure: Callable[[str, str], Awaitable[None]] | None = None
    # Retention: delete what is older than a cutoff (fix time, ms) from what else
    # keeps history (geofence events); returns counts by kind.
    purgers: list[Callable[[int], Awaitable[dict[str, int]]]] = field(
        default_factory=list
    )

    async def close(self, deadline: float | None = None) -> None:
        """Flush the pipeline, drain the event backlogs, then close what was opened,
        newest first. The backlogs are cut off at ``deadline`` (event loop time)."""
        await self.pipeline.close(deadline)
        for drain in reversed(self.drains):
            try:
                await drain(deadline)
            except Exception:
                log.exception("draining %r failed", drain)
        for closer in reversed(self.closers):
            try:
                await closer()
            except Exception:
                log.exception("closing %r failed", closer)
        await self.broker.close()
        await self.live.close()
        await self.history.close()


async def open_app(settings: Settings) -> App:
    auth = Authenticator(settings)
    # Read before any store is opened (and a new SQLite file created) for nothing.
    activity_config = ActivityConfig.from_file(settings.activity_config)
    history = await factory.open_history(settings)
    live, broker = await factory.open_live(settings)
    try:
        devices = await rebuild_live(history, live)
        log.info("live state rebuilt for %d devices", devices)
    except Unavailable as exc:  # the live repairer rebuilds it once it is back
        log.warning("live state not rebuilt at start: %s", exc.message)
    bus = EventBus()
    hub = WatchHub(broker, live, settings.max_watchers)
    await hub.start()
    pipeline = IngestPipeline(settings, history, live, broker, bus)
    shared_live = live_is_shared(live)  # Redis: a round trip per update
    if shared_live:
        pipeline.live_writer.early_watchers = hub
    checkpoints = history if settings.activity_checkpoint_s > 0 else None
    activity = ActivityProcessor(activity_config, checkpoints)
    pipeline.add_processor(activity)
    pipeline.start()
    closers: list[Callable[[], Awaitable[None]]] = []
    drains: list[Callable[[float | None], Awaitable[None]]] = []
    if checkpoints is not None:
        writer = CheckpointWriter(activity, settings.activity_checkpoint_s)
        writer.start()
        drains.append(writer.stop)  # after the pipeline's last fixes
    if shared_live:  # shared live state can lose updates
        repairer = LiveRepairer(history, live, on_rebuilt=hub.catch_up)
        repairer.start()
        closers.append(repairer.stop)
    app = App(
        settings, history, live, broker, bus, auth, pipeline, hub, activity, closers
    )
    app.drains += drains
    if settings.redis_url:  # other server processes may share the backends
        await _hear_erasures(app)
    return app


async def _hear_erasures(app: App) -> None:
    """Announce erasures to the other processes, and forget what they erase."""
    from tracking_grpc.storage.redis_client import Connection
    from tracking_grpc.storage.redis_notices import RedisDeviceNotices

    notices = RedisDeviceNotices(
        Connection(app.settings.redis_url, name="tracking-erasure-notices"),
        app.settings.redis_key_prefix,
        lambda tenant, device: erasure.forget_device(app, tenant, device),
    )
    await notices.start()
    app.announce_erasure = notices.announce
    app.closers.append(notices.close)
