"""DWELL raised by the timer for devices silent inside a fence (geofence/dwell.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.geofence.support import TENANT, summary
from tests.geofence.test_rules import FAR, INSIDE, T0, east_of_edge, square
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import EventType
from tracking_grpc.geofence.detector import FenceDetector
from tracking_grpc.geofence.index import FenceIndex
from tracking_grpc.storage.fences import Membership

DWELL_MS = 120_000
LATENESS_MS = 30_000
INDEX = FenceIndex.build(square(dwell_ms=DWELL_MS))


def fixes(*rows) -> FixBatch:
    """(seq, fix time s after T0, (lat, lon), accuracy_m, received s after T0)."""
    return FixBatch.from_columns(
        TENANT,
        ["dev"] * len(rows),
        [r[0] for r in rows],
        [T0 + int(r[1] * 1000) for r in rows],
        [r[2][0] for r in rows],
        [r[2][1] for r in rows],
        accuracy_m=[r[3] for r in rows],
        received_ms=np.array([T0 + int(r[4] * 1000) for r in rows]),
    )


def tick(detector: FenceDetector, at_s: float, index=INDEX) -> list:
    return detector.raise_due_dwells(index, T0 + int(at_s * 1000), LATENESS_MS)


def entered(index=INDEX) -> FenceDetector:
    """A detector whose device entered at T0 (received at once) and went quiet."""
    detector = FenceDetector(TENANT)
    events = detector.evaluate(fixes((1, 0, INSIDE, 5.0, 0)), index, T0)
    assert summary(events) == [("ENTER", 1)]
    return detector


def test_a_silent_device_gets_its_dwell_from_the_timer_once() -> None:
    detector = entered()
    assert tick(detector, 149) == []  # dwell + lateness not yet over
    events = tick(detector, 150)
    assert summary(events) == [("DWELL", 1)]
    assert events[0].time_ms == T0 + DWELL_MS
    assert events[0].attributes == {
        "inside_ms": str(DWELL_MS),
        "last_fix_ms": str(T0),
        "accuracy_m": "5",
    }
    assert (events[0].lat, events[0].lon) == INSIDE
    assert tick(detector, 151) == [] and tick(detector, 3_600) == []


def test_the_next_fix_inside_raises_no_second_dwell() -> None:
    detector = entered()
    tick(detector, 150)
    later = detector.evaluate(fixes((2, 200, INSIDE, 5.0, 200)), INDEX, T0)
    assert later == []
    left = detector.evaluate(fixes((3, 300, FAR, 5.0, 300)), INDEX, T0)
    assert summary(left) == [("EXIT", 3)]


def test_the_next_stay_gets_its_own_dwell() -> None:
    detector = entered()
    tick(detector, 150)
    detector.evaluate(fixes((2, 300, FAR, 5.0, 300)), INDEX, T0)
    detector.evaluate(fixes((3, 400, INSIDE, 5.0, 400)), INDEX, T0)
    events = tick(detector, 400 + 150)
    assert summary(events) == [("DWELL", 3)]
    assert events[0].time_ms == T0 + 400_000 + DWELL_MS


def test_a_fix_raising_the_dwell_leaves_the_timer_nothing() -> None:
    detector = entered()
    events = detector.evaluate(fixes((2, 121, INSIDE, 5.0, 121)), INDEX, T0)
    assert summary(events) == [("DWELL", 2)]
    assert tick(detector, 3_600) == []


def test_a_late_fix_saying_it_left_before_the_dwell_time_prevents_it() -> None:
    """The fix of 110 s (outside) reaches the detector at 145 s, within the lateness:
    the timer, whose DWELL would be due at 150 s, raises nothing."""
    detector = entered()
    assert tick(detector, 144) == []
    events = detector.evaluate(fixes((2, 110, FAR, 5.0, 145)), INDEX, T0)
    assert summary(events) == [("EXIT", 2)]
    assert tick(detector, 3_600) == []


@pytest.mark.parametrize("skew_s", [-3_600, 300], ids=["clock-behind", "clock-ahead"])
def test_a_device_clock_off_the_server_clock_gets_its_dwell_on_time(skew_s) -> None:
    """Its fixes are stamped skew_s off the server clock: the stay is measured on
    the device's clock up to its fix, then on the server's."""
    detector = FenceDetector(TENANT)
    detector.evaluate(fixes((1, skew_s, INSIDE, 5.0, 0)), INDEX, T0)
    assert tick(detector, 149) == []
    events = tick(detector, 150)
    assert [e.time_ms for e in events] == [T0 + skew_s * 1000 + DWELL_MS]


def test_an_uploading_backlog_waits_for_its_next_piece() -> None:
    """A device back online uploads a stay of an hour ago in pieces; the first
    piece ends 60 s into the stay and was just received: no DWELL before the
    rest says whether it stayed."""
    detector = FenceDetector(TENANT)
    piece = fixes(*[(i + 1, i * 20, INSIDE, 5.0, 3_600) for i in range(4)])
    detector.evaluate(piece, INDEX, T0)
    assert tick(detector, 3_601) == []
    rest = fixes((5, 80, FAR, 5.0, 3_601))
    assert summary(detector.evaluate(rest, INDEX, T0)) == [("EXIT", 5)]
    assert tick(detector, 7_200) == []


def test_vague_fixes_near_the_edge_keep_the_stay_and_its_timer() -> None:
    detector = entered()
    jitter = fixes(
        (2, 30, east_of_edge(8), 15.0, 30), (3, 60, east_of_edge(300), 1_000.0, 60)
    )
    assert detector.evaluate(jitter, INDEX, T0) == []
    assert tick(detector, 149) == []
    events = tick(detector, 150)
    assert summary(events) == [("DWELL", 3)]


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="no-dwell-ms"),
        pytest.param(
            {"dwell_ms": DWELL_MS, "events": frozenset({EventType.ENTER})},
            id="dwell-not-in-events",
        ),
    ],
)
def test_fences_that_raise_no_dwell_get_none_from_the_timer(settings) -> None:
    index = FenceIndex.build(square(**settings))
    detector = entered(index)
    assert tick(detector, 86_400, index) == []


def test_an_erased_device_gets_no_dwell() -> None:
    detector = entered()
    assert detector.forget_device("dev") == 1
    assert tick(detector, 3_600) == []


def restored(done: bool) -> FenceDetector:
    detector = FenceDetector(TENANT)
    stay = Membership("dev", "sq", T0, done, T0, INSIDE[0], INSIDE[1], 7)
    detector.seed([stay], restored_ms=T0 + 3_600_000)
    return detector


def test_a_restart_counts_the_silence_from_the_restart() -> None:
    detector = restored(done=False)
    assert tick(detector, 3_600 + 149) == []
    events = tick(detector, 3_600 + 150)
    assert [(e.type, e.fix_seq, e.time_ms) for e in events] == [
        (EventType.DWELL, 7, T0 + DWELL_MS)
    ]
    assert (events[0].lat, events[0].lon) == INSIDE


def test_a_restart_after_the_dwell_raises_none() -> None:
    assert tick(restored(done=True), 86_400) == []


def test_many_stays_are_judged_at_once() -> None:
    """Devices entered a second apart: those whose time is up, and only those."""
    n = 1_000
    detector = FenceDetector(TENANT)
    batch = FixBatch.from_columns(
        TENANT,
        [f"d{i}" for i in range(n)],
        np.ones(n, dtype=np.uint64),
        T0 + np.arange(n) * 1000,
        np.full(n, INSIDE[0]),
        np.full(n, INSIDE[1]),
        accuracy_m=np.full(n, 5.0),
        received_ms=T0 + np.arange(n) * 1000,
    )
    assert len(detector.evaluate(batch, INDEX, T0)) == n
    events = tick(detector, 150 + 499)
    assert sorted(int(e.device[1:]) for e in events) == list(range(500))
    assert len(tick(detector, 150 + 999)) == 500
