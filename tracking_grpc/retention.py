"""Retention: history older than ``retention_days`` is deleted, by the server every
hour (and at start) or once by ``tracking purge``.

Days are UTC days: with N days kept, fixes and geofence events of today and the N
days before it stay, and everything of earlier days goes (the Redis Stream of
geofence events included: ``geofence.stream_trim``). On PostgreSQL those days'
partitions of the fixes table are dropped whole. A device with no fix left loses its
sequence state and its live position (its next session starts at seq 0). An
arrived route (``routing.assignments``) goes once its arrival does: the fix time of
the last fix its monitoring applied is before the oldest day kept; a route still
being followed stays, however old.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from tracking_grpc.errors import Unavailable
from tracking_grpc.storage.base import HistoryStore, LiveStore

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
PASS_INTERVAL_S = 3600.0

Purger = Callable[[int], Awaitable[dict[str, int]]]


def cutoff_ms(now_ms: int, retention_days: int) -> int:
    """Start of the oldest UTC day kept: today minus ``retention_days`` days.

    >>> cutoff_ms(10 * DAY_MS + 5, 3) == 7 * DAY_MS
    True
    """
    return (now_ms // DAY_MS - retention_days) * DAY_MS


@dataclass(slots=True)
class PurgeReport:
    """What one retention pass deleted."""

    cutoff_ms: int
    fixes: int = 0  # deleted row by row (dropped partitions are not counted)
    partitions: int = 0
    devices: int = 0  # devices left with no fix: state and live position gone
    routes: int = 0  # arrived routes
    counts: dict[str, int] = field(default_factory=dict)  # from the purgers

    def describe(self) -> str:
        parts = [f"{self.fixes} fixes", f"{self.partitions} day partitions"]
        parts.append(f"{self.routes} arrived routes")
        parts += [f"{count} {name}" for name, count in sorted(self.counts.items())]
        parts.append(f"{self.devices} devices with nothing left")
        return ", ".join(parts)


async def purge(
    history: HistoryStore,
    live: LiveStore | None,
    purgers: Sequence[Purger],
    cutoff: int,
) -> PurgeReport:
    """Delete what is older than ``cutoff`` (fix time, ms) from every store."""
    purged = await history.purge_before(cutoff)
    report = PurgeReport(
        cutoff, purged.fixes, purged.partitions, len(purged.devices), purged.routes
    )
    for purger in purgers:
        for name, count in (await purger(cutoff)).items():
            report.counts[name] = report.counts.get(name, 0) + count
    if live is not None:
        await _forget_live(live, purged.devices, cutoff)
    return report


async def _forget_live(
    live: LiveStore, devices: list[tuple[str, str]], cutoff: int
) -> None:
    """Remove live positions older than the cutoff of devices with no fix left (a
    device that sent a newer fix meanwhile keeps its position)."""
    by_tenant: dict[str, list[str]] = defaultdict(list)
    for tenant, device in devices:
        by_tenant[tenant].append(device)
    for tenant, names in by_tenant.items():
        positions = await live.get(tenant, names)
        old = positions.device[positions.time_ms < cutoff]
        await live.remove(tenant, old.tolist())


class RetentionKeeper:
    """Runs a purge at start and every ``interval_s`` while the server runs."""

    def __init__(
        self,
        history: HistoryStore,
        live: LiveStore,
        purgers: Sequence[Purger],
        retention_days: int,
        interval_s: float = PASS_INTERVAL_S,
    ) -> None:
        self.history = history
        self.live = live
        self.purgers = purgers
        self.retention_days = retention_days
        self.interval_s = interval_s
        self.last: PurgeReport | None = None
        self.passed = asyncio.Event()  # set after each pass, done or failed
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retention")

    async def run_once(self, now_ms: int | None = None) -> PurgeReport:
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        cutoff = cutoff_ms(now_ms, self.retention_days)
        report = await purge(self.history, self.live, self.purgers, cutoff)
        log.info(
            "retention (%d days, before day %d): deleted %s",
            self.retention_days,
            cutoff // DAY_MS,
            report.describe(),
        )
        self.last = report
        return report

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Unavailable as exc:
                log.warning("retention pass failed, retried later: %s", exc.message)
            except Exception:
                log.exception("retention pass failed")
            self.passed.set()
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
