"""The recent fixes of every device of a tenant, kept for the next batch's analysis.

A live batch names a few devices out of many; the tail must hand over those
devices' rows and take their replacements at a cost in the rows involved, not in
the size of the whole fleet's tail. :class:`Tail` is an append-only log of rows in
which each device's rows form one contiguous block; replacing a device's rows
appends a new block and leaves the old one as dead space, reclaimed by compacting
once the log holds twice the live rows.

>>> tail = Tail()
>>> batch = FixBatch.from_rows("t", [("a", 1, 10, 0.0, 0.0), ("b", 1, 10, 1.0, 1.0)])
>>> tail.replace(np.array([0, 1]), batch, np.array([0, 1]))
>>> rows, slots = tail.take(np.array([1]))
>>> rows.device.tolist(), slots.tolist()
(['b'], [1])
"""

from __future__ import annotations

import numpy as np

from tracking_grpc.core.fixes import ARRAY_FIELDS, FixBatch

MIN_CAPACITY = 1_024


class Tail:
    """Rows of many devices (slots), each device's rows contiguous and in order."""

    def __init__(self) -> None:
        self.tenant = ""
        self._columns: dict[str, np.ndarray] = {}
        self._slot = np.empty(0, dtype=np.intp)
        self._used = 0  # rows of the log in use, dead ones included
        self._start = np.zeros(0, dtype=np.intp)  # per slot: first row of its block
        self._count = np.zeros(0, dtype=np.intp)  # per slot: rows in its block
        self.live = 0

    def __len__(self) -> int:
        return self.live

    def take(self, slots: np.ndarray) -> tuple[FixBatch | None, np.ndarray]:
        """The rows of distinct ``slots`` (grouped by slot) and the slot of each."""
        slots = slots[slots < self._count.size]
        rows = _block_rows(self._start[slots], self._count[slots])
        if rows.size == 0:
            return None, np.empty(0, dtype=np.intp)
        batch = FixBatch(
            tenant=self.tenant,
            **{name: self._columns[name][rows] for name in ARRAY_FIELDS},
        )
        return batch, self._slot[rows]

    def first_time_ms(self, slots: np.ndarray) -> np.ndarray:
        """Fix time of each slot's oldest row; -1 for a slot without rows."""
        first = np.full(slots.size, -1, dtype=np.int64)
        known = slots < self._count.size
        has = np.zeros(slots.size, dtype=bool)
        has[known] = self._count[slots[known]] > 0
        if has.any():
            first[has] = self._columns["time_ms"][self._start[slots[has]]]
        return first

    def replace(self, slots: np.ndarray, rows: FixBatch, row_slot: np.ndarray) -> None:
        """Make ``rows`` (grouped by slot) the whole tail of the distinct ``slots``;
        every slot of ``row_slot`` must be among ``slots``."""
        self.tenant = rows.tenant
        self._grow_slots(int(slots.max()) + 1 if slots.size else 0)
        self.live -= int(self._count[slots].sum())
        self._count[slots] = 0
        n = len(rows)
        if n:
            self._reserve(n)
            at = self._used
            for name in ARRAY_FIELDS:
                self._columns[name][at : at + n] = getattr(rows, name)
            self._slot[at : at + n] = row_slot
            self._used += n
            owners, first, counts = np.unique(
                row_slot, return_index=True, return_counts=True
            )
            self._start[owners] = at + first
            self._count[owners] = counts
            self.live += n
        if self._used > 2 * self.live + MIN_CAPACITY:
            self._compact()

    def _grow_slots(self, size: int) -> None:
        have = self._count.size
        if size <= have:
            return
        size = max(size, 2 * have, 64)
        self._start = np.concatenate([self._start, np.zeros(size - have, np.intp)])
        self._count = np.concatenate([self._count, np.zeros(size - have, np.intp)])

    def _reserve(self, extra: int) -> None:
        capacity = self._slot.size
        if self._used + extra <= capacity:
            return
        capacity = max(2 * capacity, self._used + extra, MIN_CAPACITY)
        template = FixBatch.empty("")
        for name in ARRAY_FIELDS:
            old = self._columns.get(name, getattr(template, name))
            grown = np.empty(capacity, dtype=old.dtype)
            grown[: self._used] = old[: self._used]
            self._columns[name] = grown
        slot = np.empty(capacity, dtype=np.intp)
        slot[: self._used] = self._slot[: self._used]
        self._slot = slot

    def _compact(self) -> None:
        """Move the live blocks to the front of the log, in slot order."""
        slots = np.flatnonzero(self._count)
        rows = _block_rows(self._start[slots], self._count[slots])
        for name in ARRAY_FIELDS:
            column = self._columns[name]
            column[: rows.size] = column[rows]
        self._slot[: rows.size] = self._slot[rows]
        starts = np.zeros(slots.size, dtype=np.intp)
        np.cumsum(self._count[slots][:-1], out=starts[1:])
        self._start[slots] = starts
        self._used = rows.size


def _block_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Row indexes of the blocks ``[start, start + count)``, block after block."""
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.intp)
    offsets = np.zeros(counts.size, dtype=np.intp)
    np.cumsum(counts[:-1], out=offsets[1:])
    return np.repeat(starts - offsets, counts) + np.arange(total)
