"""Erasure: one device of one tenant, everywhere this service keeps it.

Stored data first: the history store (fixes and the sequence state that drops
resends), the live store (position and Nearby index), and what the services that
store more register in ``App.device_erasers`` (geofence events, in the event store
and on the event stream). Then in-process state (:func:`forget_device`): the
activity processor and what services register in ``App.state_forgetters``
(geofence memberships, route monitoring), in this process, and through
``App.announce_erasure`` (a Redis Stream, ``storage.redis_notices``) in every other
server process sharing the backends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tracking_grpc.app import App

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
    """Erase ``device`` of ``tenant``: stored data first, then in-process state."""
    states = await app.history.device_states(tenant, [device])
    erased = Erased(sequence_reset=device in states)
    erased.fixes = await app.history.erase_device(tenant, device)
    await app.pipeline.live_writer.settled(tenant)  # no write under way puts it back
    erased.live_position = len(await app.live.get(tenant, [device])) > 0
    await app.live.remove(tenant, [device])
    for eraser in app.device_erasers:
        erased.add(await eraser(tenant, device))
    erased.add(await forget_device(app, tenant, device))
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
    """Drop ``device`` of ``tenant`` from this process's in-process state; counts
    by field of :class:`Erased` (for this process only)."""
    counts = {"activity": int(await app.activity.forget(tenant, device))}
    for forgetter in app.state_forgetters:
        for name, count in (await forgetter(tenant, device)).items():
            counts[name] = counts.get(name, 0) + count
    return counts
