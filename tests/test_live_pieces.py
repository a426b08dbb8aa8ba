"""A large commit's live update goes in pieces of at most LIVE_PIECE devices, so
that the event loop serves streams between them (live_writer._pieces)."""

from __future__ import annotations

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.live_writer import LIVE_PIECE, _pieces


def commit(devices: int) -> FixBatch:
    """Two fixes per device, the newer first for every other device."""
    names = [f"d{i:05d}" for i in range(devices)]
    older = 1_700_000_000_000 + np.arange(devices)
    newer = older + 5_000
    flip = np.arange(devices) % 2 == 0
    first, second = np.where(flip, newer, older), np.where(flip, older, newer)
    time_ms = np.concatenate([first, second])
    seq = (time_ms - 1_700_000_000_000) // 5_000 + 1
    lat = np.full(2 * devices, 47.0)
    return FixBatch.from_columns("t", names * 2, seq, time_ms, lat, lat / 6)


def test_a_large_commit_goes_in_pieces_of_each_devices_newest_fix() -> None:
    batch = commit(2 * LIVE_PIECE + 500)
    pieces = list(_pieces(batch))
    assert [len(p) for p in pieces] == [LIVE_PIECE, LIVE_PIECE, 500]
    newest = {}
    for piece in pieces:
        for device, time_ms in zip(
            piece.device.tolist(), piece.time_ms.tolist(), strict=True
        ):
            assert device not in newest
            newest[device] = time_ms
    expected = batch.take(batch.newest_per_device())
    assert newest == dict(
        zip(expected.device.tolist(), expected.time_ms.tolist(), strict=True)
    )


def test_a_small_commit_is_one_piece_as_it_is() -> None:
    batch = commit(LIVE_PIECE // 2)
    assert [p is batch for p in _pieces(batch)] == [True]
