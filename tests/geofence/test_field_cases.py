"""Geofence field cases (../shared/cases/field_cases.json) and their expected values."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.geofence.support import case_batch, case_fence, replay, summary
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.geofence.index import FenceIndex
from tracking_grpc.geofence.shapes import compile_checked, compile_shape

EVENT_CASES = ["C02", "C04", "C05", "C09", "C10"]


def expected_events(case: dict) -> list[tuple[str, int]]:
    return [(e["type"], e["seq"]) for e in case["expected"]["events"]]


@pytest.mark.parametrize("case_id", EVENT_CASES)
@pytest.mark.parametrize("one_by_one", [True, False], ids=["live", "buffered"])
def test_case_events(field_cases, case_id: str, one_by_one: bool) -> None:
    case = field_cases[case_id]
    specs = [case_fence(f) for f in case["fences"]]
    events = replay(specs, case_batch(case["fixes"]), one_by_one)
    assert summary(events) == expected_events(case)


@pytest.mark.parametrize("case_id", ["C02", "C04", "C05"])
def test_case_inside_by_seq(field_cases, case_id: str) -> None:
    case = field_cases[case_id]
    index = FenceIndex.build([case_fence(f) for f in case["fences"]])
    batch = case_batch(case["fixes"])
    pts, _ = index.contains(batch.lon, batch.lat)
    inside = {str(int(batch.seq[i])): i in set(pts.tolist()) for i in range(len(batch))}
    assert inside == case["expected"]["inside_by_seq"]


def test_c04_leg_distances_over_the_pole(field_cases) -> None:
    from tracking_grpc.geofence.shapes import GEOD

    case = field_cases["C04"]
    batch = case_batch(case["fixes"])
    _, _, legs = GEOD.inv(batch.lon[:-1], batch.lat[:-1], batch.lon[1:], batch.lat[1:])
    expected = case["expected"]["leg_distances_m"]
    assert legs == pytest.approx(expected, rel=0.005)


def test_c09_edge_jitter_raises_one_enter_and_one_exit(field_cases) -> None:
    case = field_cases["C09"]
    events = replay([case_fence(case["fences"][0])], case_batch(case["fixes"]))
    assert [e.type.name for e in events] == ["ENTER", "EXIT"]
    assert events[1].attributes["inside_ms"] == str(180_000)


def test_c06_bowtie_rejected_at_the_crossing(field_cases) -> None:
    case = field_cases["C06"]
    with pytest.raises(InvalidArgument) as caught:
        compile_shape(case_fence(case["fences"][0]).shape)
    assert "self-intersects at lon 13.405, lat 52.505" in caught.value.reason


def test_c06_repaired_bowtie_gives_the_documented_events(field_cases) -> None:
    case = field_cases["C06"]
    spec = case_fence(case["fences"][0])
    repaired = compile_checked(spec.shape, "fence.shape", repair=True)
    events = replay([replace(spec, shape=repaired.spec)], case_batch(case["fixes"]))
    alternative = case["expected"]["if_contract_documents_auto_repair"]
    assert summary(events) == [(e["type"], e["seq"]) for e in alternative["events"]]


@pytest.mark.parametrize(
    ("fence_id", "words"),
    [("open_ring", "not closed"), ("two_point_ring", "at least 4 positions")],
)
def test_c07_bad_rings_rejected(field_cases, fence_id: str, words: str) -> None:
    fence = next(f for f in field_cases["C07"]["fences"] if f["id"] == fence_id)
    with pytest.raises(InvalidArgument) as caught:
        compile_shape(case_fence(fence).shape)
    assert (
        caught.value.field.endswith("coordinates[0]") and words in caught.value.reason
    )


def test_c07_closed_ring_accepted_and_entered(field_cases) -> None:
    case = field_cases["C07"]
    fence = next(f for f in case["fences"] if f["id"] == "closed_ok")
    events = replay([case_fence(fence)], case_batch(case["fixes"]))
    expected = case["expected"]["events"]["closed_ok"]
    assert summary(events) == [(e["type"], e["seq"]) for e in expected]
