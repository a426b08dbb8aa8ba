"""The ingest pipeline: validate, store in group commits, then update live state.

Each caller's batch is queued and, together with every other batch waiting at that
moment, validated on arrays and stored in one transaction per tenant (group commit):
the per-batch work of a stream carrying one fix per message is a queue append, and the
array work is paid once per commit. The caller's future resolves once its fixes are
durable, so an ack always means stored. After each commit the newly stored fixes
update the live store and are published to watchers (``live_writer``: on Redis,
commits close together share one write); the registered processors get
them in their own task, several commits at once when they fall behind, and their
events reach the event bus.

A failing store is retried with back-off while callers wait unacknowledged; when more
than ``max_pending_fixes`` are waiting, new submissions wait too, which pauses the
streams (the devices keep their data). A gateway call waits as received, before its
request becomes a batch, and only while ``max_waiting_batch_fixes`` allow: a call
beyond them is refused with nothing stored (``admission``, which also gives the C
heap's free memory back once a large backlog has drained). When more is waiting
than one commit takes, device streams' rows go first, each device's fixes still in
the order they were submitted (``commit_queue``).

A try that stored but whose answer was lost leaves the retry finding its fixes
stored: the store then tells which are stored as this commit received them, and the
processors get those once.

A processor that raises on a batch (not a store outage, which it waits out) is
given the batch again split by device, and only the fixes of a device it still
fails on alone are left out of its events (``isolation``).

Processors whose events the bus cannot take (the event store's queue is full) wait,
and once their own queue is full the commits behind them wait too, stored and acked
but still counted as pending: ``max_pending_fixes`` then pauses the streams.

Commits are numbered as they are taken. An erasure waits until the device's fixes
submitted before it are stored and handed to the processors (``settle_device``),
and once it has erased them the processors drop the device's fixes of the commits
up to then (``erasure_cuts``); it forgets the device's state between two processor runs
(``processors_paused``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from tracking_grpc import isolation
from tracking_grpc.admission import Admission
from tracking_grpc.backlog import UnprocessedFixes
from tracking_grpc.commit_queue import CommitQueue, Submission
from tracking_grpc.config import Settings
from tracking_grpc.core import chunks, validation
from tracking_grpc.core.fixes import FixBatch, FixRow
from tracking_grpc.erasure_cuts import ErasureCuts
from tracking_grpc.errors import StorageUnavailable, Unavailable
from tracking_grpc.events import EventBus, FixProcessor, TrackingEvent
from tracking_grpc.live_writer import LiveWriter, live_is_shared
from tracking_grpc.observability import metrics, tracing
from tracking_grpc.storage.base import Broker, HistoryStore, LiveStore

log = logging.getLogger(__name__)


_STORE_AWAY = "the history store is unavailable; nothing was erased"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What became of each fix of a submitted batch."""

    batch: FixBatch
    reasons: np.ndarray  # uint8 per fix, 0 = valid
    new: np.ndarray  # bool per fix: stored now (False for rejected and duplicates)

    @property
    def valid(self) -> np.ndarray:
        return self.reasons == 0

    @property
    def stored(self) -> int:
        return int(self.new.sum())

    @property
    def duplicates(self) -> int:
        return int((self.valid & ~self.new).sum())

    @property
    def rejected(self) -> int:
        return int(np.count_nonzero(self.reasons))


class DeviceAck(NamedTuple):
    """What became of one device batch, as its ack reports it (a named tuple: one
    is made per message, and a frozen dataclass took four times as long)."""

    acked_seq: int  # highest valid sequence number (stored now or before), or 0
    stored: int
    duplicates: int
    newest_stored_seq: int  # highest sequence number stored by this batch, or 0
    # (seq, reason code, detail) of the first LISTED_REJECTIONS rejected fixes
    rejections: tuple[tuple[int, int, str], ...] = ()
    rejected: int = 0  # rejected fixes, listed or not


EMPTY_ACK = DeviceAck(0, 0, 0, 0)


class IngestPipeline:
    """Validates, group-commits and post-processes fixes."""

    def __init__(
        self,
        settings: Settings,
        history: HistoryStore,
        live: LiveStore,
        broker: Broker,
        bus: EventBus,
    ) -> None:
        self.settings = settings
        self.history = history
        self.live = live
        self.broker = broker
        self.bus = bus
        self.limits = validation.Limits(
            max_future_skew_ms=int(settings.max_future_skew_s * 1000),
            max_age_ms=int(settings.max_fix_age_s * 1000),
        )
        self.processors: list[FixProcessor] = []
        # Shared (Redis) live stores pay a round trip per write: commits close
        # together share one.
        interval_ms = settings.live_write_interval_ms if live_is_shared(live) else 0
        self.live_writer = LiveWriter(live, broker, interval_ms / 1000)
        self.backend = metrics.backend_name(history)
        self.storage_healthy = True
        # Whether a submission is queued now, waits, or is refused.
        self.admission = Admission(settings)
        self._queue = CommitQueue()
        self._processing_idle = True
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        # Bounded: when processors fall behind, commits wait (back-pressure).
        # Each commit's new fixes, with its number (``_commits``).
        self._processing: asyncio.Queue[_Commit | None] = asyncio.Queue(256)
        # Erasures: group commits are numbered as they are taken; the processors
        # drop an erased device's fixes of the commits up to its cut-off.
        self.erasure_cuts = ErasureCuts()
        self._commits = 0  # commits taken so far
        # Commits 1.._handed are through ``_flush`` (handed to the processors or
        # failed); those through out of order wait in ``_through`` (a flush that
        # left early, cancelled or failing, did not wait for the one before).
        self._handed = 0
        self._through: set[int] = set()
        self._handed_waits: list[tuple[int, asyncio.Future[None]]] = []
        # Passed by processor runs and ticks (together, as before), closed by an
        # erasure while it forgets a device's state (``processors_paused``).
        self._processors_gate = _Gate()
        self._processor_task: asyncio.Task[None] | None = None
        self._closing = False
        self._unprocessed = UnprocessedFixes()  # what a stop's deadline cut off
        concurrent = getattr(history, "concurrent_writers", False)
        self._commits_in_flight = settings.commits_in_flight if concurrent else 1

    def add_processor(self, processor: FixProcessor) -> None:
        self.processors.append(processor)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._flush_loop(), name="group-commit")
            self._ticker = asyncio.create_task(self._tick_loop(), name="processor-tick")
            self._processor_task = asyncio.create_task(
                self._process_loop(), name="processors"
            )

    async def _tick_loop(self, interval_s: float = 1.0) -> None:
        """Give processors with a ``tick(now_ms)`` (timeouts: offline, dwell) a turn,
        and give memory back once a backlog has drained."""
        while True:
            await asyncio.sleep(interval_s)
            await self.admission.release_memory_after_backlog(
                self._processing.qsize() <= 2 and self._processing_idle
            )
            async with self._processors_gate.passing():
                await self._tick(now_ms())

    async def _tick(self, now: int) -> None:
        for processor in self.processors:
            tick = getattr(processor, "tick", None)
            if tick is None:
                continue
            try:
                events = await tick(now)
            except Exception:
                log.exception("processor %s failed on tick", processor.name)
                continue
            await self.bus.emit(events)

    async def ingest(self, batch: FixBatch) -> IngestResult:
        """Validate and durably store a batch; returns once stored (or raises)."""
        if len(batch) == 0:
            empty = np.zeros(0, dtype=np.uint8)
            return IngestResult(batch, empty, empty.astype(bool))
        with tracing.span("ingest", fixes=len(batch)):
            reasons, new = await self._submit(batch)
        return IngestResult(batch, reasons, new)

    @property
    def idle(self) -> bool:
        """Nothing is queued, committing, or waiting for the processors: every
        fix stored so far has been through them."""
        return (
            self.admission.pending == 0
            and self._processing.empty()
            and self._processing_idle
        )

    async def settle_device(self, tenant: str, device: str) -> int:
        """For an erasure: return once the fixes of ``device`` submitted so far
        are stored, live and handed to the processors; the number of the last
        commit that may hold them, for ``cut_device`` once they are erased (an
        erasure that fails before has the processors drop none); its later
        fixes go through as usual."""
        waiting = self._queue.holding(tenant, device)
        while waiting and self._queue.holds_any(waiting):
            await self._handed_through(self._handed + 1)  # the next commit
        cut = self._commits
        await self._handed_through(cut)
        return cut

    def cut_device(self, tenant: str, device: str, commit: int | None = None) -> None:
        """The processors drop the fixes of ``device`` of the commits up to
        ``commit`` (None: those taken so far, for an erasure made by another
        process)."""
        cut = self._commits if commit is None else commit
        self.erasure_cuts.add(tenant, device, cut)

    @contextlib.asynccontextmanager
    async def processors_paused(self) -> AsyncIterator[None]:
        """No processor run or tick is under way in the block (it waits for the
        one under way to end): an erasure forgets a device's state in it."""
        async with self._processors_gate.closed():
            yield

    async def _handed_through(self, commit: int) -> None:
        """Return once the commits up to ``commit`` have been handed to the
        processors (or have failed); raises ``StorageUnavailable`` while the
        history store is (or once it becomes) unavailable, rather than waiting
        for it."""
        if self._handed >= commit:
            return
        if not self.storage_healthy:
            raise StorageUnavailable(_STORE_AWAY)
        waited = asyncio.get_running_loop().create_future()
        self._handed_waits.append((commit, waited))
        await waited

    def _note_handed(self, commit: int) -> None:
        """Commit ``commit`` is through ``_flush``: ``_handed`` moves on over the
        commits through with no gap before them."""
        self._through.add(commit)
        while self._handed + 1 in self._through:
            self._handed += 1
            self._through.discard(self._handed)
        if not self._handed_waits:
            return
        waits, self._handed_waits = self._handed_waits, []
        for target, waited in waits:
            if target > self._handed:
                self._handed_waits.append((target, waited))
            elif not waited.done():
                waited.set_result(None)

    def _fail_handed_waits(self) -> None:
        """The store is unavailable: those waiting for commits get an error."""
        waits, self._handed_waits = self._handed_waits, []
        for _, waited in waits:
            if not waited.done():
                waited.set_exception(StorageUnavailable(_STORE_AWAY))

    @property
    def waiting_fixes(self) -> int:
        """Fixes queued for a group commit that has not taken them yet."""
        return self._queue.fixes

    def submit_rows(
        self, tenant: str, device: str, rows: list[FixRow]
    ) -> asyncio.Future[DeviceAck]:
        """Queue one device's fixes for the next group commit, without waiting.

        The returned future resolves once they are durably stored (or raises). This
        is the per-message path of a device stream: no task, no arrays; the commit
        turns the rows of every waiting stream into columns at once. Callers check
        ``admission.congested`` first and await ``admission.wait_for_space`` when
        it is set.
        """
        done: asyncio.Future[DeviceAck] = asyncio.get_running_loop().create_future()
        if not rows:
            done.set_result(EMPTY_ACK)
            return done
        span = self._submitter_span()
        received_ms = time.time_ns() // 1_000_000  # now_ms(), a call less
        self._enqueue(
            Submission(
                tenant, len(rows), received_ms, done, span, device=device, rows=rows
            )
        )
        return done

    async def _submit(self, batch: FixBatch) -> tuple[np.ndarray, np.ndarray]:
        if self.admission.congested:
            await self.admission.wait_for_space()
        done: asyncio.Future[tuple[np.ndarray, np.ndarray]] = (
            asyncio.get_running_loop().create_future()
        )
        span = self._submitter_span()
        self._enqueue(
            Submission(batch.tenant, len(batch), now_ms(), done, span, batch=batch)
        )
        return await done

    def _enqueue(self, pending: Submission) -> None:
        if self._closing:
            raise StorageUnavailable("server is shutting down; nothing was stored")
        self._queue.append(pending)
        self.admission.enqueued(pending.size)
        self._wakeup.set()

    @staticmethod
    def _submitter_span() -> tracing.SpanContext:
        if not tracing.enabled():
            return tracing.INVALID_CONTEXT
        return tracing.current_context()

    async def _flush_loop(self) -> None:
        """Commit what is queued, starting commits at least ``flush_interval_ms``
        (on PostgreSQL ``database_flush_interval_ms``) apart; ends once closing and
        nothing is left. A fix that arrives when no commit has started for that
        long is committed at once: it waits for no one (on a quiet fleet, most
        fixes); under load each commit carries what arrived since the last.

        A store that takes concurrent writers (PostgreSQL) gets up to
        ``commits_in_flight`` commits at once. Each commit updates live state and
        publishes as soon as it is stored (newer-only updates need no order); the
        processors get the commits in commit order.
        """
        delay = self.settings.flush_interval_ms / 1000
        if getattr(self.history, "concurrent_writers", False):  # PostgreSQL
            delay = self.settings.database_flush_interval_ms / 1000
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self._commits_in_flight)
        flushing: set[asyncio.Task[None]] = set()
        previous: asyncio.Future[None] | None = None
        started = -delay
        while True:
            if not self._queue:
                if self._closing:
                    break
                await self._wakeup.wait()
                self._wakeup.clear()
            # Commits start at least ``delay`` apart, each carrying what arrived
            # meanwhile, instead of back to back in ever smaller (and costlier per
            # fix) commits.
            pause = started + delay - loop.time()
            if pause > 0 and not self._closing:
                await asyncio.sleep(pause)
            if self._queue:
                await slots.acquire()
                started = loop.time()
                finished = loop.create_future()
                taken = self._queue.take(self.settings.flush_max_fixes)
                self._commits += 1
                if self._queue:
                    self._wakeup.set()
                task = asyncio.create_task(
                    self._flush(taken, self._commits, previous, finished, _Slot(slots))
                )
                flushing.add(task)
                task.add_done_callback(flushing.discard)
                previous = finished
        await asyncio.gather(*flushing)

    async def _flush(
        self,
        items: list[Submission],
        commit: int,
        previous: asyncio.Future[None] | None,
        finished: asyncio.Future[None],
        slot: _Slot,
    ) -> None:
        """Commit ``items`` (commit number ``commit``) and update live state;
        once the previous flush is through, hand the new fixes to the processors.

        The commit's slot is given back once its fixes are stored and acked: a
        slow live store (Redis paused, failing over) or slow processors then hold
        up live positions and events, not the next commits' acks. Their fixes
        still count as queued until the end, so ``max_pending_fixes`` bounds what
        waits behind them.
        """
        try:
            metrics.commit_started(time.time() * 1000, [i.received_ms for i in items])
            by_tenant: dict[str, list[Submission]] = defaultdict(list)
            for item in items:
                by_tenant[item.tenant].append(item)
            stored: list[tuple[FixBatch, FixBatch, tracing.SpanContext]] = []
            live_written: list[asyncio.Future[None]] = []
            for tenant_items in by_tenant.values():
                links = [item.span for item in tenant_items]
                with tracing.span("ingest.commit", links, backend=self.backend):
                    try:
                        outcome = await self._commit(tenant_items)
                    except Exception as exc:
                        # A fault of this tenant's commit (the store refused its
                        # data): its callers get the error, other tenants go on.
                        log.exception(
                            "commit of tenant %s failed", tenant_items[0].tenant
                        )
                        _fail(tenant_items, exc)
                        continue
                    if outcome is not None and len(outcome[0]):
                        stored.append((*outcome, tracing.current_context()))
                        # Queued as its acks are resolved, before they are sent.
                        live_written.append(self.live_writer.add(outcome[0]))
            slot.release()
            if live_written:
                # Shielded: the write goes on for the others if this is cancelled.
                await asyncio.shield(asyncio.gather(*live_written))
            if previous is not None:
                await previous
            if self.processors:
                for _, new, span in stored:
                    if len(new):
                        await self._processing.put(_Commit(new, span, commit))
        finally:
            slot.release()
            finished.set_result(None)
            self._note_handed(commit)
            await self.admission.finished(sum(i.size for i in items))

    def _validate(self, items: list[Submission]) -> tuple[FixBatch, np.ndarray]:
        """The items' fixes as one batch, in item order, stamped with their receive
        times; and the reason code of each fix."""
        parts: list[FixBatch] = []
        run: list[Submission] = []  # consecutive row items become one part
        for item in items:
            if item.rows is not None:
                run.append(item)
                continue
            if run:
                parts.append(_rows_batch(run))
                run = []
            assert item.batch is not None
            parts.append(item.batch)
        if run:
            parts.append(_rows_batch(run))
        received = np.repeat(
            np.array([i.received_ms for i in items], dtype=np.int64),
            [i.size for i in items],
        )
        batch = replace(FixBatch.concat(parts), received_ms=received)
        reasons = validation.reasons(batch, now_ms(), self.limits)
        metrics.fixes_validated(reasons)
        return batch, reasons

    async def _commit(
        self, items: list[Submission]
    ) -> tuple[FixBatch, FixBatch] | None:
        """Validate and store; resolves the callers' futures. The fixes for the live
        state, and the new ones (for the processors)."""
        batch, reasons = self._validate(items)
        valid = reasons == 0
        new = np.zeros(len(batch), dtype=bool)
        retried = False
        if valid.any():
            outcome = await self._store(
                batch if valid.all() else batch.take(valid), items
            )
            if outcome is None:
                return None  # shutting down with the store away: callers got the error
            new[valid], retried = outcome
        if retried:
            # A failed try may have stored fixes after all (a commit whose answer
            # was lost); the retry then finds them stored. Asked which are stored
            # as this commit received them, the store tells them from resends, so
            # the acks count them as stored and the processors get them once. The
            # live state, which takes only what is newer than it holds, gets every
            # valid fix.
            new |= await self._stored_by_lost_answer(batch, valid)
        _resolve(items, batch, reasons, new)
        metrics.fixes_stored(valid, new)
        fresh = batch.take(new)
        return (batch.take(valid) if retried else fresh), fresh

    async def _stored_by_lost_answer(
        self, batch: FixBatch, valid: np.ndarray
    ) -> np.ndarray:
        """After a retried store, the mask of the valid fixes stored as this commit
        received them, whichever try stored them; a fix repeated within the commit
        counts once. Empty when the store cannot tell (the processors miss them)."""
        found = np.zeros(len(batch), dtype=bool)
        try:
            stored = await self.history.stored_as_received(batch.take(valid))
        except StorageUnavailable as exc:
            log.warning("cannot tell what failed tries stored; no events: %s", exc)
            return found
        found[_first_per_fix(batch, np.flatnonzero(valid)[stored])] = True
        return found

    async def _store(
        self, batch: FixBatch, items: list[Submission]
    ) -> tuple[np.ndarray, bool] | None:
        """Store, retrying while the store is unavailable; the mask of new rows,
        and whether a try failed first."""
        backoff = 0.05
        retried = False
        while True:
            try:
                with (
                    tracing.span("storage.store", fixes=len(batch)),
                    metrics.timed_flush(self.backend, len(batch)),
                ):
                    new = await self.history.store(batch)
                break
            except StorageUnavailable as exc:
                if self.storage_healthy:
                    log.warning("history store unavailable, holding acks: %s", exc)
                self.storage_healthy = False
                self._fail_handed_waits()
                if self._closing:
                    for item in items:
                        if not item.done.done():
                            item.done.set_exception(exc)
                    return None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                retried = True
        if not self.storage_healthy:
            log.warning("history store is back; writes resumed")
            self.storage_healthy = True
        return new, retried

    def _waiting_work(
        self, first: _Commit
    ) -> tuple[list[tuple[FixBatch, list[tracing.SpanContext]]], bool]:
        """The first commit and every other already waiting, joined per tenant,
        without the fixes that erasures cut off; and whether the end marker was
        among them."""
        by_tenant: dict[str, list[_Commit]] = {}
        item: _Commit | None = first
        ended = False
        while item is not None:
            by_tenant.setdefault(item.fixes.tenant, []).append(item)
            if self._processing.empty():
                break
            item = self._processing.get_nowait()
            ended = item is None
        cuts = self.erasure_cuts
        work = [
            (
                FixBatch.concat(
                    [cuts.cut(i.fixes, i.number) if cuts else i.fixes for i in items]
                ).sorted_by_device_time(),
                [i.span for i in items],
            )
            for items in by_tenant.values()
        ]
        return [(fixes, links) for fixes, links in work if len(fixes)], ended

    async def _process_loop(self) -> None:
        """Runs processors on stored fixes off the commit path. The commits waiting
        by then go through together (one sort, one call); a run starts at least
        ``processor_interval_ms`` after the previous one, so under load each call's
        fixed cost is shared by many commits. A large run (a gateway's or a
        device's backlog) goes in pieces, the event loop serving streams between
        them (``core.chunks``)."""
        interval = self.settings.processor_interval_ms / 1000
        loop = asyncio.get_running_loop()
        ended = False
        while not ended and (item := await self._processing.get()) is not None:
            started = loop.time()
            self._processing_idle = False
            async with self._processors_gate.passing():
                work, ended = self._waiting_work(item)
                # Every commit handed so far is in this run or an earlier one.
                through = self._handed
                for stored, links in work:
                    for n, piece in enumerate(chunks.pieces(stored)):
                        if n:
                            await asyncio.sleep(0)  # streams are served in between
                        await self._process(piece, links)
                        oldest_ms = int(piece.received_ms.min()) if len(piece) else 0
                        metrics.processed(max(now_ms() - oldest_ms, 0) / 1000)
                if self.erasure_cuts:
                    self.erasure_cuts.passed(through)
            self._processing_idle = True
            pause = interval - (loop.time() - started)
            if not ended and pause > 0:
                await asyncio.sleep(pause)

    async def _process(
        self, stored: FixBatch, links: list[tracing.SpanContext]
    ) -> None:
        if self._unprocessed.cut:  # past the stop's deadline
            self._unprocessed.leave(stored)
            return
        for n, processor in enumerate(self.processors):
            if n:
                await asyncio.sleep(0)  # streams are served in between
            events = await self._events_of(processor, stored, links)
            await self.bus.emit(events)

    async def _events_of(
        self,
        processor: FixProcessor,
        stored: FixBatch,
        links: list[tracing.SpanContext],
    ) -> list[TrackingEvent]:
        """The processor's events of ``stored``; when it fails on the batch, those
        of the devices it does not fail on, tried apart (``isolation``)."""

        def run(part: FixBatch) -> Awaitable[list[TrackingEvent]]:
            return self._run_processor(processor, part, links)

        try:
            try:
                return await run(stored)
            except Unavailable:
                raise
            except Exception as exc:
                failure = exc
            return await isolation.by_device(processor.name, stored, run, failure)
        except Unavailable as exc:  # only at a stop: it waits for its store else
            log.warning(
                "processor %s stopped waiting for its store; %d fixes of tenant %s "
                "left out of its events: %s",
                processor.name,
                len(stored),
                stored.tenant,
                exc,
            )
            return []

    async def _run_processor(
        self,
        processor: FixProcessor,
        stored: FixBatch,
        links: list[tracing.SpanContext],
    ) -> list[TrackingEvent]:
        """The processor's events, retried with back-off while a store it reads is
        unavailable (the geofence processor reads its fences before it changes
        anything): stored fixes are not dropped from the events for an outage."""
        backoff = 0.05
        waited = False
        while True:
            try:
                with tracing.span(
                    f"process.{processor.name}", links, fixes=len(stored)
                ):
                    events = await processor.process(stored)
            except (StorageUnavailable, Unavailable) as exc:
                if self._closing:
                    raise
                # Once per outage, not once per try.
                log.log(
                    logging.DEBUG if waited else logging.WARNING,
                    "processor %s waits for its store: %s",
                    processor.name,
                    exc,
                )
                waited = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if waited:
                log.warning("processor %s has its store back", processor.name)
            return events

    async def close(self, deadline: float | None = None) -> None:
        """Store what is queued (acks for it may no longer reach anyone), then stop.

        The processors go on with their backlog until ``deadline`` (event loop
        time; None: to its end). Then they finish the piece they are in and begin
        no other: the stored fixes they did not get are logged per tenant and
        counted (``backlog``).
        """
        self._closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        self._wakeup.set()
        await self.admission.close()
        cut = None
        if deadline is not None:
            cut = asyncio.get_running_loop().call_at(deadline, self._cut_off)
        try:
            if self._task is not None:
                await self._task
                self._task = None
            if self._processor_task is not None:
                await self._processing.put(None)
                await self._processor_task
                self._processor_task = None
        finally:
            await self.live_writer.close()
            if cut is not None:
                cut.cancel()
            self._unprocessed.report()

    def _cut_off(self) -> None:
        """The stop's deadline: what waits for the processors is left to none, and
        a processor waiting for room on the bus (a full event store) is let go."""
        self._unprocessed.cut_off()
        self.bus.release()
        ended = False
        while not self._processing.empty():
            item = self._processing.get_nowait()
            if item is None:
                ended = True
            else:
                self._unprocessed.leave(item.fixes)
        if ended:
            self._processing.put_nowait(None)


class _Commit(NamedTuple):
    """A group commit's new fixes of one tenant, for the processors."""

    fixes: FixBatch
    span: tracing.SpanContext
    number: int  # the commit's number, in the order commits are taken


class _Gate:
    """Processor runs and ticks pass it together; closing it waits for those under
    way and holds new ones back until it opens again (one closer at a time)."""

    __slots__ = ("_closers", "_empty", "_inside", "_open")

    def __init__(self) -> None:
        self._inside = 0
        self._empty = asyncio.Event()
        self._empty.set()
        self._open = asyncio.Event()
        self._open.set()
        self._closers = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def passing(self) -> AsyncIterator[None]:
        while not self._open.is_set():
            await self._open.wait()
        self._inside += 1
        self._empty.clear()
        try:
            yield
        finally:
            self._inside -= 1
            if not self._inside:
                self._empty.set()

    @contextlib.asynccontextmanager
    async def closed(self) -> AsyncIterator[None]:
        async with self._closers:
            self._open.clear()
            try:
                while self._inside:
                    await self._empty.wait()
                yield
            finally:
                self._open.set()


class _Slot:
    """One of the commits-in-flight slots, given back once."""

    __slots__ = ("_slots",)

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


def _first_per_fix(batch: FixBatch, rows: np.ndarray) -> np.ndarray:
    """Of ``rows`` (ascending), those not repeating an earlier one's device and fix
    time: the store keeps the first of such fixes and no other."""
    keys = np.rec.fromarrays([batch.device[rows].astype(str), batch.time_ms[rows]])
    _, first = np.unique(keys, return_index=True)  # each key's first place
    return rows[np.sort(first)]


def _fail(items: list[Submission], error: Exception) -> None:
    """Ends the waits of ``items`` not yet answered with ``error``."""
    for item in items:
        if not item.done.done():
            item.done.set_exception(error)


def _rows_batch(items: list[Submission]) -> FixBatch:
    """The rows of consecutive device submissions of one tenant as one batch."""
    rows = [row for item in items for row in item.rows or ()]
    devices = np.array([item.device for item in items], dtype=object)
    return FixBatch.from_fix_rows(
        items[0].tenant, np.repeat(devices, [item.size for item in items]), rows
    )


def _resolve(
    items: list[Submission], batch: FixBatch, reasons: np.ndarray, new: np.ndarray
) -> None:
    """Give each waiting submitter its outcome: row items a ``DeviceAck`` (computed
    for all of them at once), batch items their slices of ``reasons`` and ``new``."""
    sizes = np.array([item.size for item in items], dtype=np.intp)
    starts = np.zeros(len(items), dtype=np.intp)
    np.cumsum(sizes[:-1], out=starts[1:])
    seq = batch.seq
    valid = reasons == 0
    zero = np.uint64(0)
    acked = np.maximum.reduceat(np.where(valid, seq, zero), starts).tolist()
    newest = np.maximum.reduceat(np.where(new, seq, zero), starts).tolist()
    stored = np.add.reduceat(new, starts, dtype=np.int64).tolist()
    duplicates = np.add.reduceat(valid & ~new, starts, dtype=np.int64).tolist()
    rejected: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    bad = np.flatnonzero(reasons)
    owners = np.searchsorted(starts, bad, side="right") - 1
    counts = np.bincount(owners, minlength=len(items)).tolist()
    # Each owner's first LISTED_REJECTIONS are listed; the rest only counted.
    rank = np.arange(len(bad)) - np.searchsorted(owners, owners)
    listed = rank < validation.LISTED_REJECTIONS
    for owner, row in zip(owners[listed].tolist(), bad[listed].tolist(), strict=True):
        reason = int(reasons[row])
        text = validation.detail(batch, row, reason)
        rejected[owner].append((int(seq[row]), reason, text))
    received_ms = []
    for i, item in enumerate(items):
        if item.done.done():
            continue
        received_ms.append(item.received_ms)
        if item.rows is None:
            part = slice(int(starts[i]), int(starts[i]) + item.size)
            item.done.set_result((reasons[part], new[part]))
        else:
            item.done.set_result(
                DeviceAck(
                    acked[i],
                    stored[i],
                    duplicates[i],
                    newest[i],
                    tuple(rejected[i]) if i in rejected else (),
                    counts[i],
                )
            )
    metrics.fixes_acked(time.time() * 1000, received_ms)
