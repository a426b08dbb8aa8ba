"""Cutting a batch of stored fixes into pieces the event processors can take one at
a time without holding the event loop for long.

A processor keeps state per device and expects each device's fixes in time order,
as consecutive commits bring them. The pieces keep that: a row's piece never comes
before that of an earlier fix of its device. A piece holds at most ``max_rows``
fixes and at most ``max_ranks`` fixes of any one device, since work that runs
once per fix of a device (the Kalman filter steps through a device's fixes one
after another) grows with the latter, not with the number of devices.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tracking_grpc.core.fixes import FixBatch

MAX_ROWS = 1_024
MAX_RANKS = 32


def ranks(devices: np.ndarray) -> np.ndarray:
    """Each row's place among its device's rows (0 for the first), for rows
    grouped by device."""
    if devices.size == 0:
        return np.zeros(0, dtype=np.intp)
    first = np.append(True, devices[1:] != devices[:-1])
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, devices.size))
    return np.arange(devices.size) - np.repeat(starts, sizes)


def pieces(
    batch: FixBatch, max_rows: int = MAX_ROWS, max_ranks: int = MAX_RANKS
) -> Iterator[FixBatch]:
    """``batch`` (sorted by device, then time) in pieces, in the order they must be
    processed; the whole batch when it is small enough."""
    rank = ranks(batch.device)
    if len(batch) <= max_rows and (rank.size == 0 or rank.max() < max_ranks):
        yield batch
        return
    order = np.argsort(rank, kind="stable")  # by rank, then device and time
    by_rank = rank[order]
    start = 0
    while start < order.size:
        rank_limit = np.searchsorted(by_rank, by_rank[start] + max_ranks)
        end = min(start + max_rows, int(rank_limit))
        yield batch.take(np.sort(order[start:end]))
        start = end
