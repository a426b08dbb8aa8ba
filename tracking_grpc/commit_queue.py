"""The submissions waiting for a group commit, and which of them the next commit takes.

A device stream submits one device's rows per message; a gateway call submits a
batch of many devices. When more is waiting than one commit takes
(``flush_max_fixes``), device streams' rows go first, each device's fixes still in
the order they were submitted, and a gateway batch passed over once goes ahead of
them in the next commit (``CommitQueue.take``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque
from dataclasses import dataclass

from tracking_grpc.core.fixes import FixBatch, FixRow
from tracking_grpc.observability import tracing


@dataclass(slots=True)
class Submission:
    """A submission waiting for its group commit: a batch, or one device's rows."""

    tenant: str
    size: int
    received_ms: int
    done: asyncio.Future
    span: tracing.SpanContext
    batch: FixBatch | None = None
    device: str = ""
    rows: list[FixRow] | None = None
    passed_over: bool = False  # a batch left for a later commit once (_take_fair)
    _devices: frozenset[str] | None = None

    def devices(self) -> frozenset[str]:
        """The devices of a batch submission (worked out once), or of a row one."""
        if self.batch is None:
            return frozenset((self.device,))
        if self._devices is None:
            self._devices = frozenset(self.batch.device.tolist())
        return self._devices


class CommitQueue:
    """Submissions in arrival order, with the fixes they hold."""

    __slots__ = ("_items", "_rows", "fixes")

    def __init__(self) -> None:
        self._items: deque[Submission] = deque()
        self._rows = 0  # device row submissions waiting
        self.fixes = 0  # fixes waiting

    def __len__(self) -> int:
        return len(self._items)

    def append(self, item: Submission) -> None:
        self._items.append(item)
        self.fixes += item.size
        self._rows += item.rows is not None

    def holding(self, tenant: str, device: str) -> list[Submission]:
        """The waiting submissions with fixes of ``device`` (an erasure's wait)."""
        return [
            item
            for item in self._items
            if item.tenant == tenant and device in item.devices()
        ]

    def holds_any(self, items: list[Submission]) -> bool:
        """Whether one of ``items`` is still waiting."""
        ids = {id(item) for item in items}
        return any(id(item) in ids for item in self._items)

    def take(self, limit: int) -> list[Submission]:
        """The next commit's submissions: everything waiting when it fits in
        ``limit`` fixes, else device streams' rows first (``_take_fair``)."""
        if self.fixes <= limit:
            taken = list(self._items)
            self._items.clear()
            self._rows = 0
        else:
            taken = self._take_fair(limit)
        self.fixes -= sum(item.size for item in taken)
        return taken

    def _take_fair(self, limit: int) -> list[Submission]:
        """About ``limit`` fixes of a queue longer than a commit, device streams'
        small messages ahead of gateway batches.

        Batches passed over by an earlier commit that are still at the head of
        the queue go first (a gateway backlog is not starved); then every device
        row submission up to ``limit``, except one whose device has fixes in a
        submission left waiting before it: a device's fixes are stored in the
        order they were submitted (commits start in queue order and lock each
        device's row, and a device resumes after the highest sequence number
        stored). The room left goes to the rest in arrival order. The queue is
        walked only as far as ``limit`` takes it (a queue of gateway batches
        alone is taken in order, without looking at their devices).
        """
        queue, taken, count = self._items, [], 0
        while queue and count < limit and (queue[0].passed_over or not self._rows):
            item = queue.popleft()
            taken.append(item)
            count += item.size
        left: deque[Submission] = deque()
        held: dict[str, set[str]] = defaultdict(set)  # devices of what is left
        while queue and count < limit:
            item = queue.popleft()
            devices = held[item.tenant]
            if item.rows is None:
                left.append(item)
                devices.update(item.devices())
            elif item.device not in devices:
                taken.append(item)
                count += item.size
            else:
                left.append(item)
                devices.add(item.device)
        passed = len(left)
        while left and count < limit:
            item = left.popleft()
            taken.append(item)
            count += item.size
            passed -= 1
        for item in itertools.islice(left, passed):
            item.passed_over = item.rows is None
        left.extend(queue)
        self._items = left
        self._rows -= sum(1 for item in taken if item.rows is not None)
        return taken
