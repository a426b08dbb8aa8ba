"""Live writes of newly stored fixes: the live store, then the watchers' broker.

Each commit's new fixes move the devices' live positions (the newest per device)
and are published to watchers. On Redis a write is a script call whose fixed cost
(about 0.7 ms of this process's CPU and 0.2 ms of Redis's, against some 5 and 12 µs
per fix: ``bench/live_update_bench.py``) outweighs its rows at a stream commit's
size, so the commits that reach the writer within ``live_write_interval_ms`` of its
last write go in one. A commit waits for the write that carries its fixes, as it
waited for its own before: a slow live store still holds its fixes as pending
(back-pressure), and processors still see a commit only once its positions are
live. This process's watchers are offered the fixes at once, before the write
(``EarlyWatchers``), so the interval does not delay them; a watcher added before
a write lands gets its fixes once more after it. This process's reads of positions
wait for the writes under way (``settled``), so a position acked here is read here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Protocol

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import Unavailable
from tracking_grpc.observability import metrics
from tracking_grpc.storage.base import Broker, LiveStore

log = logging.getLogger(__name__)

# Devices per live update: a piece is one Redis call (SINGLE_CALL_ROWS in
# storage.redis_live), and a large write's pieces let streams be served between.
LIVE_PIECE = 1_000


class EarlyWatchers(Protocol):
    """This process's watchers, offered new positions before their live write."""

    def offer_early(self, updates: FixBatch) -> int: ...

    def added_since(self, mark: int) -> bool: ...


def live_is_shared(live: LiveStore) -> bool:
    """Whether ``live`` is shared by server processes (Redis): a write is then a
    round trip, and the state can be lost and rebuilt."""
    return hasattr(live, "needs_rebuild")


class LiveWriter:
    """Writes stored fixes to the live store and publishes those that moved a
    device, several commits' at once; see the module docstring."""

    def __init__(self, live: LiveStore, broker: Broker, interval_s: float) -> None:
        self.live = live
        self.broker = broker
        self.interval_s = interval_s
        # Set when the live store is shared (Redis): this process's watchers then
        # get new positions without waiting for the live write's round trip.
        self.early_watchers: EarlyWatchers | None = None
        self.healthy = True
        self._pending: dict[str, list[FixBatch]] = {}
        # Whether the pending fixes' publish must reach this process's watchers
        # too: some were not offered early, or a watcher was added since the
        # first offer (``_first_mark``) and may have read its snapshot before
        # the write.
        self._publish_local = False
        self._first_mark: int | None = None
        self._written: asyncio.Future[None] | None = None  # of the pending fixes
        self._writing: asyncio.Future[None] | None = None  # of the write under way
        self._writing_tenants: frozenset[str] = frozenset()
        self._wakeup = asyncio.Event()
        self._reader_waits = asyncio.Event()  # cuts the pause short
        self._task: asyncio.Task[None] | None = None
        self._last_write = float("-inf")

    def add(self, stored: FixBatch) -> asyncio.Future[None]:
        """Offer ``stored`` to this process's watchers and queue its live write;
        the future is done once that write is (failed writes are logged and
        counted, never raised: the history is intact and the live state is
        rebuilt). Called as the commit resolves its acks, so a read that waits
        for ``settled`` after an ack finds the fixes pending or written."""
        loop = asyncio.get_running_loop()
        if len(stored) == 0:  # nothing to write: done now, not at the next write
            done = loop.create_future()
            done.set_result(None)
            return done
        if self._written is None:
            self._written = loop.create_future()
        mark = self._offer_early(stored)
        if mark is None:
            self._publish_local = True
        elif self._first_mark is None:
            self._first_mark = mark
        self._pending.setdefault(stored.tenant, []).append(stored)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="live-writer")
        self._wakeup.set()
        return self._written

    async def settled(self, tenant: str) -> None:
        """Return once the fixes of ``tenant`` handed to the writer so far are
        live (or their write failed): a read of the live store after it sees every
        fix of the tenant acked by this process before it was called. A pending
        write goes at once rather than after the rest of its pause."""
        waits = []
        if tenant in self._pending and self._written is not None:
            waits.append(self._written)
            self._reader_waits.set()
        if tenant in self._writing_tenants and self._writing is not None:
            waits.append(self._writing)
        if waits:
            await asyncio.shield(asyncio.gather(*waits))

    async def close(self) -> None:
        """Stop the writer; whoever still waits for a write is let go."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for waited in (self._writing, self._written):
            if waited is not None and not waited.done():
                waited.set_result(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                continue
            pause = self._last_write + self.interval_s - loop.time()
            if pause > 0 and not self._reader_waits.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reader_waits.wait(), pause)
            self._reader_waits.clear()
            self._last_write = loop.time()
            pending, self._pending = self._pending, {}
            written, self._written = self._written, None
            self._writing, self._writing_tenants = written, frozenset(pending)
            publish_local, first_mark = self._publish_local, self._first_mark
            self._publish_local, self._first_mark = False, None
            try:
                for batches in pending.values():
                    stored = (
                        FixBatch.concat(batches) if len(batches) > 1 else batches[0]
                    )
                    await self._write(stored, publish_local, first_mark)
            finally:
                self._writing_tenants = frozenset()
                if written is not None and not written.done():
                    written.set_result(None)

    async def _write(
        self, stored: FixBatch, publish_local: bool, first_mark: int | None
    ) -> None:
        """Live update and fan-out of one tenant's fixes. Not in commit order: a
        fix older than the device's live position moves nothing and is not
        published, and watchers never go back in fix time."""
        try:
            for n, piece in enumerate(_pieces(stored)):
                if n:
                    await asyncio.sleep(0)  # streams are served in between
                moved = await self.live.update(piece)
                if len(moved):
                    local = publish_local or (
                        first_mark is not None and self._added_since(first_mark)
                    )
                    await self.broker.publish(moved, local=local)
            if not self.healthy:
                log.warning("live updates resumed")
            self.healthy = True
        except Unavailable as exc:  # rebuilt from history when it returns
            metrics.live_update_failed("unavailable")
            if self.healthy:  # once per outage, not once per write
                log.warning("live updates skipped; history is intact: %s", exc.message)
            self.healthy = False
        except Exception:
            # A fault of the update itself (a script error, a key of the wrong
            # type): counted, so an alert can tell it from an outage.
            metrics.live_update_failed("error")
            log.exception("live update failed; history is intact")

    def _offer_early(self, stored: FixBatch) -> int | None:
        """Offer the newest fix per device to this process's watchers before the
        live write; the watchers' mark, or None when not offered."""
        if self.early_watchers is None:
            return None
        try:
            return self.early_watchers.offer_early(
                stored.take(stored.newest_per_device())
            )
        except Exception:  # the publish after the live write offers them again
            log.exception("early offer to watchers failed")
            return None

    def _added_since(self, mark: int) -> bool:
        assert self.early_watchers is not None
        return self.early_watchers.added_since(mark)


def _pieces(stored: FixBatch) -> Iterator[FixBatch]:
    """The newest fix of each device in ``stored``, in pieces of at most
    ``LIVE_PIECE`` devices; ``stored`` itself when it is that small."""
    if len(stored) <= LIVE_PIECE:
        yield stored
        return
    newest = stored.newest_per_device()
    for start in range(0, newest.size, LIVE_PIECE):
        yield stored.take(newest[start : start + LIVE_PIECE])
