"""Enter, exit, dwell and cross rules on inputs of each kind the field cases sample."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.geofence.support import NOW_MS, TENANT, summary
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import EventType
from tracking_grpc.geofence.detector import FenceDetector
from tracking_grpc.geofence.index import FenceIndex
from tracking_grpc.geofence.model import FenceSpec, Schedule, ScheduleWindow, ShapeSpec
from tracking_grpc.geofence.shapes import GEOD

T0 = 1_704_700_800_000  # Monday 2024-01-08 08:00 UTC
# A 200 m x 200 m square at 52.52 N, 13.40 E (edges east at lon E_LON).
S, N, W, E_LON = 52.5191, 52.5209, 13.3985, 13.4015
SQUARE = ShapeSpec.geojson(
    json.dumps(
        {
            "type": "Polygon",
            "coordinates": [[[W, S], [E_LON, S], [E_LON, N], [W, N], [W, S]]],
        }
    )
)


def east_of_edge(metres: float) -> tuple[float, float]:
    """(lat, lon) this many metres east of the square's east edge (negative: inside)."""
    lon, lat, _ = GEOD.fwd(E_LON, 52.52, 90.0 if metres >= 0 else 270.0, abs(metres))
    return lat, lon


def run(fences, fixes, batches=None, detector=None):
    """Events of fixes (seq, seconds after T0, (lat, lon), accuracy_m or None)."""
    index = FenceIndex.build(fences)
    detector = detector or FenceDetector(TENANT)
    groups = batches or [[i] for i in range(len(fixes))]
    events = []
    for group in groups:
        rows = [fixes[i] for i in group]
        batch = FixBatch.from_columns(
            TENANT,
            ["dev"] * len(rows),
            [r[0] for r in rows],
            [T0 + int(r[1] * 1000) for r in rows],
            [r[2][0] for r in rows],
            [r[2][1] for r in rows],
            accuracy_m=[np.nan if r[3] is None else r[3] for r in rows],
        )
        events += detector.evaluate(batch, index, NOW_MS)
    return events


def square(**settings) -> list[FenceSpec]:
    return [FenceSpec("sq", SQUARE, **settings)]


@pytest.mark.parametrize(
    ("offsets", "accuracy", "expected"),
    [
        pytest.param(
            [50, -5, 8, -3, 9, -4, 60],
            10.0,
            [("ENTER", 2), ("EXIT", 7)],
            id="jitter-with-accuracy",
        ),
        pytest.param(
            [50, -3, 3, -2, 4, -3, 6],
            None,
            [("ENTER", 2), ("EXIT", 7)],
            id="jitter-without-accuracy",
        ),
        pytest.param([50, -10, 20, -10, 24], 25.0, [("ENTER", 2)], id="wide-jitter"),
    ],
)
def test_edge_jitter_raises_one_enter_and_one_exit(offsets, accuracy, expected) -> None:
    fixes = [(i + 1, i * 30, east_of_edge(d), accuracy) for i, d in enumerate(offsets)]
    assert summary(run(square(), fixes)) == expected


@pytest.mark.parametrize(
    ("fixes", "expected"),
    [
        pytest.param(
            [(1, 0, (52.52, 13.40), 500.0), (2, 60, (52.52, 13.40), 150.0)],
            [],
            id="no-enter-when-circle-bigger-than-fence",
        ),
        pytest.param(
            [
                (1, 0, (52.52, 13.40), 10.0),
                (2, 60, east_of_edge(300), 1000.0),
                (3, 120, east_of_edge(300), 20.0),
            ],
            [("ENTER", 1), ("EXIT", 3)],
            id="no-exit-on-a-vague-fix",
        ),
        pytest.param(
            [(1, 0, (52.52, 13.40), 10.0), (2, 60, (52.52, 13.40), 3000.0)],
            [("ENTER", 1)],
            id="vague-fix-inside-changes-nothing",
        ),
    ],
)
def test_accuracy_decides_what_a_fix_may_do(fixes, expected) -> None:
    assert summary(run(square(), fixes)) == expected


def test_max_accuracy_setting_overrides_the_fence_size() -> None:
    fixes = [(1, 0, (52.52, 13.40), 150.0)]
    assert summary(run(square(max_accuracy_m=200.0), fixes)) == [("ENTER", 1)]


INSIDE, FAR = (52.52, 13.40), (52.60, 13.60)


def test_late_fix_changes_nothing_and_raises_nothing() -> None:
    fixes = [
        (1, 0, FAR, 5.0),
        (2, 60, INSIDE, 5.0),
        (3, 120, INSIDE, 5.0),
        (4, 30, INSIDE, 5.0),
        (5, 90, FAR, 5.0),
    ]
    assert summary(run(square(), fixes)) == [("ENTER", 2)]


def test_buffered_batch_is_evaluated_in_fix_time_order() -> None:
    fixes = [(3, 120, FAR, 5.0), (1, 0, FAR, 5.0), (2, 60, INSIDE, 5.0)]
    events = run(square(), fixes, batches=[[0, 1, 2]])
    assert summary(events) == [("ENTER", 2), ("EXIT", 3)]


def test_silent_inside_then_far_away_exits_with_time_inside() -> None:
    fixes = [(1, 0, INSIDE, 5.0), (2, 2 * 86_400, FAR, 5.0)]
    events = run(square(), fixes)
    assert summary(events) == [("ENTER", 1), ("EXIT", 2)]
    assert events[1].attributes["inside_ms"] == str(2 * 86_400_000)


def test_dwell_once_per_stay() -> None:
    stay = [(i + 1, i * 60, INSIDE, 5.0) for i in range(6)]
    again = [(7, 400, FAR, 5.0), (8, 500, INSIDE, 5.0), (9, 700, INSIDE, 5.0)]
    events = run(square(dwell_ms=120_000), stay + again)
    assert summary(events) == [
        ("ENTER", 1),
        ("DWELL", 3),
        ("EXIT", 7),
        ("ENTER", 8),
        ("DWELL", 9),
    ]


def test_dwell_counts_across_batches() -> None:
    fixes = [(1, 0, INSIDE, 5.0), (2, 60, INSIDE, 5.0), (3, 130, INSIDE, 5.0)]
    events = run(square(dwell_ms=120_000), fixes, batches=[[0], [1, 2]])
    assert summary(events) == [("ENTER", 1), ("DWELL", 3)]


WEST, EAST = (52.52, 13.39), (52.52, 13.41)  # either side of the square, outside


@pytest.mark.parametrize(
    ("fixes", "expected"),
    [
        pytest.param(
            [(1, 0, WEST, 5.0), (2, 60, EAST, 5.0)], [("CROSS", 2)], id="through"
        ),
        pytest.param(
            [(1, 0, WEST, 5.0), (2, 60, (52.53, 13.41), 5.0)], [], id="passes-north"
        ),
        pytest.param([(1, 0, WEST, 5.0), (2, 60, EAST, 900.0)], [], id="vague-end"),
        pytest.param(
            [(1, 0, WEST, 5.0), (2, 30, INSIDE, 5.0), (3, 60, EAST, 5.0)],
            [("ENTER", 2), ("EXIT", 3)],
            id="seen-inside",
        ),
    ],
)
def test_cross_between_sparse_fixes(fixes, expected) -> None:
    events = [EventType.ENTER, EventType.EXIT, EventType.CROSS]
    assert summary(run(square(events=frozenset(events)), fixes)) == expected


def test_schedule_freezes_membership_outside_its_windows() -> None:
    nine_to_five = Schedule(
        "Europe/London", (ScheduleWindow(frozenset({1}), 540, 1020),)
    )
    fixes = [(1, 0, INSIDE, 5.0), (2, 3_600, INSIDE, 5.0), (3, 9.5 * 3_600, FAR, 5.0)]
    assert summary(run(square(schedule=nine_to_five), fixes)) == [("ENTER", 2)]


def test_deleted_fence_raises_no_exit() -> None:
    detector = FenceDetector(TENANT)
    run(square(), [(1, 0, INSIDE, 5.0)], detector=detector)
    other = [FenceSpec("other", ShapeSpec.circle(0.0, 0.0, 10.0))]
    assert run(other, [(2, 60, FAR, 5.0)], detector=detector) == []
    assert detector.inside("dev") == []


def test_many_devices_and_fences_in_one_batch_match_one_by_one() -> None:
    rng = np.random.default_rng(7)
    fences = [
        FenceSpec(
            f"c{i}", ShapeSpec.circle(52.5 + i / 100, 13.4, 400.0), dwell_ms=60_000
        )
        for i in range(5)
    ]
    n = 400
    lat = 52.5 + rng.integers(0, 5, n) / 100 + rng.normal(0, 0.003, n)
    batch = FixBatch.from_columns(
        TENANT,
        rng.choice(["a", "b", "c"], n),
        np.arange(n),
        T0 + np.arange(n) * 1000,
        lat,
        13.4 + rng.normal(0, 0.003, n),
        accuracy_m=rng.uniform(3, 60, n),
    )
    index = FenceIndex.build(fences)
    whole = FenceDetector(TENANT).evaluate(batch, index, NOW_MS)
    single, one = [], FenceDetector(TENANT)
    for i in np.argsort(batch.time_ms):
        single += one.evaluate(batch.take(np.array([i])), index, NOW_MS)
    assert sorted(e.event_id for e in whole) == sorted(e.event_id for e in single)
    assert len(whole) > 20


@pytest.mark.parametrize(
    ("centre", "start", "end", "crosses"),
    [
        pytest.param(
            (52.52, 13.40), (52.52, 13.39), (52.52, 13.41), True, id="circle-through"
        ),
        pytest.param(
            (52.52, 13.40),
            (52.5213, 13.39),
            (52.5213, 13.41),
            False,
            id="circle-passes-150m-north",
        ),
        pytest.param(
            (0.0, 180.0),
            (0.0, 179.9),
            (0.0, -179.9),
            True,
            id="circle-on-the-antimeridian",
        ),
    ],
)
def test_cross_of_circles_measured_on_the_ground(centre, start, end, crosses) -> None:
    fence = FenceSpec(
        "c", ShapeSpec.circle(*centre, 100.0), events=frozenset({EventType.CROSS})
    )
    events = run([fence], [(1, 0, start, 5.0), (2, 60, end, 5.0)])
    assert summary(events) == ([("CROSS", 2)] if crosses else [])
