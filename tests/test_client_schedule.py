"""Replay timing: the time offset, due times and batching of a trace."""

from __future__ import annotations

import numpy as np
import pytest

from tracking_grpc.client.schedule import (
    Pace,
    ReplayOptions,
    batch_bounds,
    stamped_times,
)
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.traces import build_trace

START_MS = 1_800_000_000_000
TIMES_MS = np.array([0, 10_000, 30_000, 60_000]) + 1_600_000_000_000


def sent_and_stamped(pace: Pace) -> tuple[np.ndarray, np.ndarray]:
    """Wall time at which each fix is sent, and the time it is stamped with."""
    first, duration = int(TIMES_MS[0]), int(TIMES_MS[-1] - TIMES_MS[0])
    sent = START_MS + pace.due_ms(TIMES_MS, first)
    return sent, TIMES_MS + pace.offset_ms(START_MS, first, duration)


def test_real_time_stamps_every_fix_at_its_send_time():
    sent, stamped = sent_and_stamped(Pace(speed=1.0))
    assert stamped.tolist() == sent.tolist()


@pytest.mark.parametrize("speed", [2.0, 7.0, 10.0, 600.0, 1234.5])
def test_faster_stamps_last_fix_when_sent_and_keeps_spacing(speed):
    sent, stamped = sent_and_stamped(Pace(speed=speed))
    assert stamped[-1] == sent[-1]
    assert np.all(stamped <= sent)
    assert np.diff(stamped).tolist() == np.diff(TIMES_MS).tolist()


def test_fast_sends_everything_now_and_ends_at_the_start():
    sent, stamped = sent_and_stamped(Pace(fast=True))
    assert sent.tolist() == [START_MS] * 4
    assert stamped[-1] == START_MS


def test_slower_than_real_time_never_stamps_in_the_future():
    sent, stamped = sent_and_stamped(Pace(speed=0.5))
    assert np.all(stamped <= sent)


@pytest.mark.parametrize("speed", [0.0, -1.0, float("nan"), float("inf")])
def test_pace_refuses_bad_speeds(speed):
    with pytest.raises(InvalidArgument, match="speed"):
        Pace(speed=speed)


def test_original_times_are_kept_on_request():
    trace = build_trace(
        np.array(["a"] * 4, dtype=object), TIMES_MS, [1.0] * 4, [2.0] * 4
    )
    options = ReplayOptions(pace=Pace(fast=True), original_times=True)
    assert stamped_times(trace, options, START_MS).tolist() == TIMES_MS.tolist()


@pytest.mark.parametrize(
    ("due_ms", "tick_ms", "max_fixes", "starts"),
    [
        pytest.param([0, 0, 0], 20, 100, [0], id="same-moment-one-batch"),
        pytest.param([0, 5, 25, 26], 20, 100, [0, 2], id="tick-boundaries"),
        pytest.param([0] * 5, 20, 2, [0, 2, 4], id="fast-chunks"),
        pytest.param([0, 0, 0, 40, 40, 40], 20, 2, [0, 2, 3, 5], id="chunks-per-tick"),
        pytest.param([], 20, 2, [], id="empty"),
    ],
)
def test_batch_bounds(due_ms, tick_ms, max_fixes, starts):
    assert (
        batch_bounds(np.array(due_ms, dtype=np.int64), tick_ms, max_fixes).tolist()
        == starts
    )
