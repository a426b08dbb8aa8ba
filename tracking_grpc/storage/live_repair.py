"""Keeps live state in step with history across live-store outages.

History is the source of truth. When the live store missed updates (it was down)
or lost its data (Redis restarted), the repairer notices through ``ping`` and the
store's ``needs_rebuild`` flag, and replays every device's newest stored fix into
it. The live store only accepts newer fixes, so a rebuild racing live updates
cannot move any position backwards. After a rebuild it calls ``on_rebuilt``: the
watch hub offers open watches what the skipped live updates would have sent them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeGuard

from tracking_grpc.errors import Unavailable
from tracking_grpc.storage.base import HistoryStore, LiveStore

log = logging.getLogger(__name__)


class RebuildableLiveStore(LiveStore, Protocol):
    """A live store that can lose state and tracks when a rebuild made it good."""

    @property
    def needs_rebuild(self) -> bool: ...

    def rebuild_started(self) -> int: ...

    def rebuild_done(self, mark: int) -> None: ...


def _needs_rebuild(live: LiveStore) -> TypeGuard[RebuildableLiveStore]:
    return bool(getattr(live, "needs_rebuild", False))


async def rebuild_live(history: HistoryStore, live: LiveStore) -> int:
    """Write each device's newest stored fix into the live store; returns the count.

    A store with ``repair`` (Redis) re-applies fixes it already holds, which mends
    a GEO index that missed a move into a cell; one with ``mend_index`` then takes
    each tenant's devices out of cells they have left."""
    devices = 0
    tenants: set[str] = set()
    write = getattr(live, "repair", live.update)
    async for batch in history.newest_positions():
        await write(batch)
        devices += len(batch)
        tenants.add(batch.tenant)
    mend_index = getattr(live, "mend_index", None)
    if mend_index is not None:
        for tenant in sorted(tenants):
            await mend_index(tenant)
    return devices


class LiveRepairer:
    """Watches a live store and rebuilds it from history when it needs it."""

    def __init__(
        self,
        history: HistoryStore,
        live: LiveStore,
        interval_s: float = 1.0,
        on_rebuilt: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.history = history
        self.live = live
        self.interval_s = interval_s
        self.on_rebuilt = on_rebuilt
        self.available = True
        self._task: asyncio.Task | None = None

    async def check(self) -> bool:
        """Probe the live store, rebuild it if needed; True when it is usable."""
        try:
            await self.live.ping()
            if _needs_rebuild(self.live):
                mark = self.live.rebuild_started()
                devices = await rebuild_live(self.history, self.live)
                self.live.rebuild_done(mark)
                log.warning("rebuilt live state of %d devices from history", devices)
                if self.on_rebuilt is not None:
                    await self.on_rebuilt()
        except Unavailable as exc:
            if self.available:
                log.warning("live store unavailable: %s", exc.message)
            if hasattr(self.live, "lost_state"):
                self.live.lost_state()
            self.available = False
            return False
        if not self.available:
            log.warning("live store available again")
        self.available = True
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="live-repairer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)
