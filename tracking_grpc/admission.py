"""Whether a submission may be queued now, must wait, or (a gateway call) is refused.

The decision rests on the fixes pending: queued for a group commit or in one, until
handed to the processors. Below ``max_pending_fixes`` everything is queued at once.
At or above it, device streams wait (``wait_for_space``), which pauses them while the
devices keep their data; a gateway call waits as received, before its request
becomes a batch, and only while ``max_waiting_batch_fixes`` allow: a call beyond is
refused with RESOURCE_EXHAUSTED and a retry delay, nothing of it stored
(``admit_batch``), so what a congested server holds for gateways stays bounded.

The same count tells when a large backlog has drained: the C heap's free memory is
then given back to the system (``release_memory_after_backlog``, ``heap``).
"""

from __future__ import annotations

import asyncio
import logging

from tracking_grpc import heap
from tracking_grpc.config import Settings
from tracking_grpc.errors import Congested

log = logging.getLogger(__name__)

# How long a gateway call refused while storage is behind is told to wait.
RETRY_AFTER_S = 1.0
# A backlog this large leaves the C heap's freed memory to be given back once it has
# drained (``heap.release_free_memory``).
RELEASE_AFTER_FIXES = 50_000


class Admission:
    """Counts the pending fixes and lets submissions in, holds them, or refuses."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pending = 0  # fixes queued and in commits (until processed)
        self.waiting_batch_fixes = 0  # of gateway calls waiting for room, as received
        self._refusing = False  # gateway calls are being refused (logged once)
        self._peak = 0  # most fixes pending since memory was last released
        self._closing = False
        self._space = asyncio.Condition()

    @property
    def congested(self) -> bool:
        """Whether new submissions must wait (``wait_for_space``) before queueing."""
        return self.pending >= self.settings.max_pending_fixes

    def enqueued(self, fixes: int) -> None:
        """Count ``fixes`` just queued as pending."""
        self.pending += fixes
        if self.pending > self._peak:
            self._peak = self.pending

    async def finished(self, fixes: int) -> None:
        """Count ``fixes`` as no longer pending, and wake who waits for room."""
        self.pending -= fixes
        if self._refusing and not self.congested:
            log.info("storage caught up: gateway calls are taken again")
            self._refusing = False
        async with self._space:
            self._space.notify_all()

    async def close(self) -> None:
        """Let every waiter go: the pipeline is closing."""
        self._closing = True
        async with self._space:
            self._space.notify_all()

    async def wait_for_space(self) -> None:
        """Wait until fewer than ``max_pending_fixes`` are pending (or closing)."""
        async with self._space:
            await self._space.wait_for(lambda: not self.congested or self._closing)

    async def admit_batch(self, fixes: int) -> None:
        """Wait for room for a gateway call of ``fixes`` fixes, before its request
        is turned into a batch.

        While ``max_pending_fixes`` are pending, calls wait holding their request
        only, up to ``max_waiting_batch_fixes`` fixes among them; a call beyond is
        refused (``Congested``, RESOURCE_EXHAUSTED) with nothing of it stored.
        """
        if not self.congested:
            return
        waiting, limit = self.waiting_batch_fixes, self.settings.max_waiting_batch_fixes
        # The first call waits whatever its size: a call larger than the bound
        # would otherwise be refused for as long as storage stays behind.
        if limit == 0 or (waiting and waiting + fixes > limit):
            if not self._refusing:
                log.warning(
                    "storage is behind (%d fixes pending): refusing gateway calls",
                    self.pending,
                )
                self._refusing = True
            raise Congested(
                f"storage is behind: {self.pending} fixes wait to be stored "
                f"and {waiting} more in gateway calls; nothing of this call "
                f"({fixes} fixes) was stored",
                RETRY_AFTER_S,
            )
        self.waiting_batch_fixes += fixes
        try:
            await self.wait_for_space()
        finally:
            self.waiting_batch_fixes -= fixes

    async def release_memory_after_backlog(self, processors_drained: bool) -> None:
        """Once a backlog of ``RELEASE_AFTER_FIXES`` or more has been stored and
        processed, give the C heap's free pages back to the system: the many small
        blocks it was built of stay in malloc's free lists otherwise, and the
        process keeps its peak size (``heap``). Under load the pipeline is never
        empty: drained means a tenth of that pending and ``processors_drained``
        (a commit or two waiting for the processors, and they between runs)."""
        drained = self.pending <= RELEASE_AFTER_FIXES // 10 and processors_drained
        if not drained or self._peak < RELEASE_AFTER_FIXES:
            return
        peak, self._peak = self._peak, 0
        before = heap.resident_bytes()
        if not await asyncio.to_thread(heap.release_free_memory):
            return
        after = heap.resident_bytes()
        log.info(
            "a backlog of %d fixes drained: resident memory %.0f -> %.0f MB",
            peak,
            before / 1e6,
            after / 1e6,
        )
