"""Cutting stored fixes into pieces for the event processors (core.chunks)."""

from __future__ import annotations

import numpy as np
import pytest

from tracking_grpc.core import chunks
from tracking_grpc.core.fixes import FixBatch


def backlog(runs: dict[str, int]) -> FixBatch:
    """Each device's run of fixes, one a second, sorted by device and time."""
    devices = [d for d, n in runs.items() for _ in range(n)]
    seq = np.concatenate([np.arange(1, n + 1) for n in runs.values()])
    time_ms = 1_700_000_000_000 + seq * 1000
    lat = np.full(seq.size, 47.0)
    batch = FixBatch.from_columns("t", devices, seq, time_ms, lat, lat / 6)
    return batch.sorted_by_device_time()


def test_ranks_count_within_each_device() -> None:
    batch = backlog({"a": 3, "b": 1, "c": 2})
    assert chunks.ranks(batch.device).tolist() == [0, 1, 2, 0, 0, 1]


def test_a_small_batch_is_one_piece() -> None:
    batch = backlog({"a": 5, "b": 5})
    assert [len(p) for p in chunks.pieces(batch)] == [10]


@pytest.mark.parametrize(
    ("runs", "max_rows", "max_ranks"),
    [
        ({"one-backlog": 1_000}, 4_096, 128),  # a device's day of buffered fixes
        ({f"d{i:03d}": 40 for i in range(300)}, 1_000, 128),  # a gateway's batch
        ({"long": 700, **{f"s{i}": 3 for i in range(500)}}, 256, 100),  # mixed
    ],
)
def test_pieces_keep_each_device_in_time_order_within_the_limits(
    runs, max_rows, max_ranks
) -> None:
    batch = backlog(runs)
    pieces = list(chunks.pieces(batch, max_rows, max_ranks))
    assert len(pieces) > 1
    seen: dict[str, list[int]] = {}
    for piece in pieces:
        assert len(piece) <= max_rows
        assert chunks.ranks(piece.device).max() < max_ranks
        assert (piece.sorted_by_device_time().seq == piece.seq).all()
        for device, seq in zip(piece.device.tolist(), piece.seq.tolist(), strict=True):
            seen.setdefault(device, []).append(seq)
    assert seen == {d: list(range(1, n + 1)) for d, n in runs.items()}
