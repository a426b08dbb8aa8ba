"""Rows grouped by device: boundaries and per-group helpers on flat arrays.

Every activity step works on fixes of many devices at once, sorted by device and
fix time; a :class:`Groups` tells where each device's rows begin and end.

>>> g = Groups.of(np.array(["a", "a", "b"], dtype=object))
>>> g.starts.tolist(), g.first.tolist()
([0, 2], [True, False, True])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Groups:
    starts: np.ndarray  # index of each group's first row
    ends: np.ndarray  # index one past each group's last row
    index: np.ndarray  # group number of each row

    @classmethod
    def of(cls, device: np.ndarray) -> Groups:
        """Groups of consecutive equal device ids (rows sorted by device)."""
        n = len(device)
        if n == 0:
            empty = np.empty(0, dtype=np.intp)
            return cls(empty, empty, empty)
        change = np.ones(n, dtype=bool)
        change[1:] = device[1:] != device[:-1]
        starts = np.flatnonzero(change)
        ends = np.append(starts[1:], n)
        index = np.cumsum(change) - 1
        return cls(starts, ends, index)

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def first(self) -> np.ndarray:
        """True on each group's first row."""
        mask = np.zeros(self.index.shape[0], dtype=bool)
        mask[self.starts] = True
        return mask

    @property
    def last(self) -> np.ndarray:
        mask = np.zeros(self.index.shape[0], dtype=bool)
        mask[self.ends - 1] = True
        return mask

    def row_start(self) -> np.ndarray:
        return self.starts[self.index]

    def row_end(self) -> np.ndarray:
        return self.ends[self.index]


def previous_where(mask: np.ndarray, groups: Groups) -> np.ndarray:
    """For each row, the index of the nearest earlier row of its group with mask set.

    -1 where there is none. The row itself does not count.
    """
    n = mask.shape[0]
    marked = np.where(mask, np.arange(n), -1)
    shifted = np.empty(n, dtype=np.intp)
    if n:
        shifted[0] = -1
        shifted[1:] = marked[:-1]
    running = np.maximum.accumulate(shifted) if n else shifted
    return np.where(running >= groups.row_start(), running, -1)


def forward_fill(
    values: np.ndarray, valid: np.ndarray, groups: Groups, fill
) -> np.ndarray:
    """Each row takes the newest valid value of its group up to and including it."""
    n = valid.shape[0]
    marked = np.where(valid, np.arange(n), -1)
    running = np.maximum.accumulate(marked) if n else marked
    ok = running >= groups.row_start()
    out = np.full(n, fill, dtype=values.dtype)
    out[ok] = values[running[ok]]
    return out


def runs(labels: np.ndarray, groups: Groups) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of maximal runs of equal labels within groups."""
    n = labels.shape[0]
    if n == 0:
        empty = np.empty(0, dtype=np.intp)
        return empty, empty
    change = groups.first.copy()
    change[1:] |= labels[1:] != labels[:-1]
    starts = np.flatnonzero(change)
    return starts, np.append(starts[1:], n)
