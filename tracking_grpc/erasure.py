"""Erasure: one device of one tenant, everywhere this service keeps it.

First the pipeline settles the device: its fixes submitted before the erasure are
stored and live (``IngestPipeline.settle_device``); the fixes it sends from then on
are new data, processed as usual. Then stored data: the history store (fixes and the
sequence state that drops resends) and the live store (position and Nearby index).
Once its fixes are erased, the device is marked so that the event processors drop
those from before the erasure whenever they reach them (``erasure_cuts``: an erasure
that fails before drops none). Then, with the processors paused between two runs:
in-process state (the activity processor and what services register in
``App.state_forgetters``: geofence memberships, route monitoring), the events of the
device queued for the event store, and what the services that store more register in
``App.device_erasers`` (stored events, from which memberships would be reloaded).
The activity checkpoint is erased after the pause, once no checkpoint round is under
way (which may take seconds on a large fleet); until then it is not restored, and
the round under way does not write it again. Then what its data was published to
(``App.published_erasers``: the event stream), and ``App.announce_erasure`` (a Redis
Stream, ``storage.redis_notices``) tells every other server process sharing the
backends, which forgets the device's state (:func:`forget_device`) and drops its
fixes waiting for its processors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tracking_grpc.app import App, DeviceEraser

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Erased:
    """What an erasure removed; a device found nowhere erases nothing."""

    fixes: int = 0
    events: int = 0
    stream_entries: int = 0  # of the Redis Stream of geofence events
    live_position: bool = False
    memberships: int = 0
    activity: bool = False
    route: bool = False
    sequence_reset: bool = False

    def add(self, counts: dict[str, int]) -> None:
        """Add a part's counts (by field name; for a flag, above 0 sets it)."""
        known = {f.name for f in fields(self)}
        for name, count in counts.items():
            if name not in known:
                raise ValueError(f"an eraser counted {name!r}, not a part of Erased")
            current = getattr(self, name)
            setattr(self, name, type(current)(current + count))


async def erase_device(app: App, tenant: str, device: str) -> Erased:
    """Erase ``device`` of ``tenant``: what the pipeline holds of it settled,
    stored fixes and live position, in-process state, then stored events."""
    cut = await app.pipeline.settle_device(tenant, device)
    states = await app.history.device_states(tenant, [device])
    erased = Erased(sequence_reset=device in states)
    erased.fixes = await app.history.erase_device(tenant, device)
    # Only now, its fixes erased: an erasure that failed before has the
    # processors drop none of them (it erased nothing).
    app.pipeline.cut_device(tenant, device, cut)
    await app.pipeline.live_writer.settled(tenant)  # no write under way puts it back
    erased.live_position = len(await app.live.get(tenant, [device])) > 0
    await app.live.remove(tenant, [device])
    erased.add(await _forget_here(app, tenant, device, app.device_erasers))
    for eraser in app.published_erasers:
        erased.add(await eraser(tenant, device))
    if app.announce_erasure is not None:
        await app.announce_erasure(tenant, device)
    log.info(
        "erased device %r of tenant %s: %d fixes, %d events, %d event stream entries",
        device,
        tenant,
        erased.fixes,
        erased.events,
        erased.stream_entries,
    )
    return erased


async def forget_device(app: App, tenant: str, device: str) -> dict[str, int]:
    """Another process erased ``device`` of ``tenant``: this one's processors drop
    its fixes of the commits taken so far, and it forgets its in-process state;
    counts by field of :class:`Erased` (for this process only)."""
    app.pipeline.cut_device(tenant, device)
    return await _forget_here(app, tenant, device)


async def _forget_here(
    app: App, tenant: str, device: str, erasers: Sequence[DeviceEraser] = ()
) -> dict[str, int]:
    """Drop ``device`` of ``tenant`` from this process's in-process state and from
    its events waiting for the event store, then erase it with ``erasers``, all
    between two processor runs (the processors drop its fixes already cut off,
    and its later fixes find nothing to reload state from); counts by field of
    :class:`Erased`."""
    counts: dict[str, int] = {}

    def add(found: dict[str, int]) -> None:
        for name, count in found.items():
            counts[name] = counts.get(name, 0) + count

    try:
        async with app.pipeline.processors_paused():
            # Not waiting for a checkpoint round under way (seconds on a large
            # fleet, the processors paused): its checkpoint is erased after.
            add({"activity": int(await app.activity.drop_device(tenant, device))})
            for forgetter in app.state_forgetters:
                add(await forgetter(tenant, device))
            await app.bus.forget_device(tenant, device)  # no event of it is queued
            for eraser in erasers:
                add(await eraser(tenant, device))
    finally:
        await app.activity.erase_checkpoint(tenant, device)
    return counts
