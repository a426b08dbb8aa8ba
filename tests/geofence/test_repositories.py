"""One contract for the fence and event repositories, run on SQLite and PostGIS."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tracking_grpc.errors import AlreadyExists, FailedPrecondition, NotFound
from tracking_grpc.events import ActivityDetail, EventType, TrackingEvent
from tracking_grpc.geofence.model import (
    FenceSpec,
    Schedule,
    ScheduleWindow,
    ShapeSpec,
)
from tracking_grpc.storage.fences import EventQuery

SQUARE = '{"type":"Polygon","coordinates":[[[2,48],[3,48],[3,49],[2,49],[2,48]]]}'


def fence(fence_id: str, *labels: str) -> FenceSpec:
    return FenceSpec(fence_id, ShapeSpec.geojson(SQUARE), labels=labels)


def event(device: str, kind: EventType, time_ms: int, tenant: str) -> TrackingEvent:
    return TrackingEvent(
        f"{device}-{int(kind)}-{time_ms}",
        tenant,
        device,
        kind,
        time_ms,
        48.5,
        2.5,
        1,
        5,
        fence_id="a",
        attributes={"accuracy_m": "8"},
    )


async def test_create_then_get_round_trips(geo_stores, tenant) -> None:
    fences, _ = geo_stores
    spec = FenceSpec(
        "depot",
        ShapeSpec.circle(52.5, 13.4, 100.0),
        name="Depot",
        dwell_ms=60_000,
        events=frozenset({EventType.ENTER}),
        labels=("fleet",),
        metadata={"k": "v"},
        schedule=Schedule("Europe/Berlin", (ScheduleWindow(frozenset({1}), 0, 60),)),
    )
    created = await fences.create(tenant, spec, now_ms=1000)
    assert created.version == 1 and created.created_ms == 1000
    assert await fences.get(tenant, "depot") == created


async def test_create_twice_is_already_exists(geo_stores, tenant) -> None:
    fences, _ = geo_stores
    await fences.create(tenant, fence("a"), 1)
    with pytest.raises(AlreadyExists):
        await fences.create(tenant, fence("a"), 2)


async def test_update_checks_the_version(geo_stores, tenant) -> None:
    fences, _ = geo_stores
    await fences.create(tenant, fence("a"), 1)
    updated = await fences.update(tenant, fence("a", "x"), 2, expected_version=1)
    assert (updated.version, updated.created_ms, updated.labels) == (2, 1, ("x",))
    with pytest.raises(FailedPrecondition):
        await fences.update(tenant, fence("a"), 3, expected_version=1)


@pytest.mark.parametrize("operation", ["get", "delete", "update"])
async def test_missing_fence_is_not_found(geo_stores, tenant, operation) -> None:
    fences, _ = geo_stores
    with pytest.raises(NotFound):
        if operation == "update":
            await fences.update(tenant, fence("nope"), 1)
        else:
            await getattr(fences, operation)(tenant, "nope")


async def test_delete_removes_and_bumps_the_revision(geo_stores, tenant) -> None:
    fences, _ = geo_stores
    await fences.create(tenant, fence("a"), 1)
    before = await fences.revision(tenant)
    await fences.delete(tenant, "a")
    assert await fences.all(tenant) == []
    assert await fences.revision(tenant) != before


async def test_tenants_with_fences_are_listed(geo_stores, tenant) -> None:
    fences, _ = geo_stores
    assert tenant not in await fences.tenants()
    await fences.create(tenant, fence("a"), 1)
    assert tenant in await fences.tenants()


async def test_list_pages_by_id_and_filters_by_labels(geo_stores, tenant) -> None:
    fences, _ = geo_stores
    await fences.import_many(
        tenant, [fence("c", "x"), fence("a", "x", "y"), fence("b", "y")], 1, False
    )
    first = await fences.list(tenant, [], limit=2)
    rest = await fences.list(tenant, [], limit=2, after=first[-1].fence_id)
    assert [f.fence_id for f in first + rest] == ["a", "b", "c"]
    assert [f.fence_id for f in await fences.list(tenant, ["x"], 10)] == ["a", "c"]
    assert [f.fence_id for f in await fences.list(tenant, ["x", "y"], 10)] == ["a"]


async def test_import_is_all_or_nothing(geo_stores, tenant) -> None:
    fences, _ = geo_stores
    await fences.create(tenant, fence("b"), 1)
    with pytest.raises(AlreadyExists):
        await fences.import_many(tenant, [fence("a"), fence("b")], 2, False)
    assert [f.fence_id for f in await fences.all(tenant)] == ["b"]
    result = await fences.import_many(tenant, [fence("a"), fence("b")], 3, True)
    assert (result.created, result.replaced) == (1, 1)


async def test_tenants_do_not_see_each_other(geo_stores, tenant) -> None:
    fences, _ = geo_stores
    await fences.create(tenant, fence("a"), 1)
    assert await fences.all(tenant + "-other") == []


async def test_events_are_deduplicated_and_listed_by_time(geo_stores, tenant) -> None:
    _, events = geo_stores
    stored = [
        event("d1", EventType.EXIT, 20, tenant),
        event("d1", EventType.ENTER, 10, tenant),
        event("d2", EventType.ENTER, 15, tenant),
    ]
    assert await events.add(stored) == 3
    assert await events.add(stored[:1]) == 0
    found = await events.list(EventQuery(tenant, 0, 100))
    assert [e.time_ms for e in found] == [10, 15, 20]
    assert found[0] == stored[1]


async def test_events_filter_and_page(geo_stores, tenant) -> None:
    _, events = geo_stores
    await events.add([event("d1", EventType.ENTER, t, tenant) for t in range(10)])
    await events.add([event("d2", EventType.EXIT, 5, tenant)])
    page = await events.list(EventQuery(tenant, 2, 8, device="d1", limit=3))
    after = (page[-1].time_ms, page[-1].event_id)
    rest = await events.list(EventQuery(tenant, 2, 8, device="d1", after=after))
    assert [e.time_ms for e in page + rest] == [2, 3, 4, 5, 6, 7]
    exits = await events.list(
        EventQuery(tenant, 0, 99, types=frozenset({EventType.EXIT}))
    )
    assert [e.device for e in exits] == ["d2"]


async def test_memberships_follow_the_latest_events(geo_stores, tenant) -> None:
    _, events = geo_stores
    await events.add(
        [
            event("in", EventType.ENTER, 10, tenant),
            event("stayed", EventType.ENTER, 10, tenant),
            event("stayed", EventType.DWELL, 70, tenant),
            event("left", EventType.ENTER, 10, tenant),
            event("left", EventType.EXIT, 20, tenant),
        ]
    )
    found = sorted(await events.memberships(tenant), key=lambda m: m.device)
    assert [(m.device, m.entered_ms, m.dwell_done, m.last_event_ms) for m in found] == [
        ("in", 10, False, 10),
        ("stayed", 10, True, 70),
    ]


async def test_memberships_of_some_devices_in_one_query(geo_stores, tenant) -> None:
    """What a process taking devices over reads (one query however many)."""
    _, events = geo_stores
    await events.add(
        [
            event("in", EventType.ENTER, 10, tenant),
            event("left", EventType.ENTER, 10, tenant),
            event("left", EventType.EXIT, 20, tenant),
            event("other", EventType.ENTER, 10, tenant),
            *(event(f"many-{n}", EventType.ENTER, 5, tenant) for n in range(1_500)),
        ]
    )
    some = ["in", "left", "absent", *(f"many-{n}" for n in range(1_500))]
    found = await events.memberships(tenant, some)
    assert sorted(m.device for m in found) == sorted(["in", *some[3:]])
    # The newest event of each device named, over every fence, left ones too.
    assert found.newest_ms == {"in": 10, "left": 20} | {d: 5 for d in some[3:]}
    assert (await events.memberships(tenant, [])).newest_ms == {}
    assert await events.memberships(tenant, []) == []
    assert len(await events.memberships(tenant)) == 1_502


async def test_memberships_carry_the_position_of_their_enter(
    geo_stores, tenant
) -> None:
    """What a DWELL raised by the timer after a restart reports as the position."""
    _, events = geo_stores
    old_stay = event("d", EventType.ENTER, 10, tenant)
    enter = replace(event("d", EventType.ENTER, 30, tenant), lat=48.6, fix_seq=4)
    await events.add([old_stay, event("d", EventType.EXIT, 20, tenant), enter])
    (found,) = await events.memberships(tenant)
    assert (found.entered_ms, found.lat, found.lon, found.fix_seq) == (30, 48.6, 2.5, 4)


# The oldest unpublished events come first, and the PostgreSQL database is shared by
# the session's tests: a page large enough for what other tests leave unpublished.
OUTBOX_PAGE = 1_000_000


async def test_outbox_lists_unpublished_until_marked(geo_stores, tenant) -> None:
    _, events = geo_stores
    stored = [
        event("d", EventType.ENTER, 10, tenant),
        event("d", EventType.EXIT, 20, tenant),
    ]
    await events.add(stored)
    pending = [e for e in await events.unpublished(OUTBOX_PAGE) if e.tenant == tenant]
    assert pending == stored
    await events.mark_published(pending[:1])
    assert [e for e in await events.unpublished(OUTBOX_PAGE) if e.tenant == tenant] == [
        stored[1]
    ]


async def test_activity_and_route_events_keep_their_detail(geo_stores, tenant) -> None:
    _, events = geo_stores
    trip = replace(
        event("van", EventType.TRIP_ENDED, 10, tenant),
        fence_id="",
        activity=ActivityDetail(motion=2, distance_m=1234.5, since_ms=3),
    )
    off = replace(
        event("van", EventType.OFF_ROUTE, 20, tenant),
        fence_id="",
        route_id="delivery-1",
        attributes={"deviation_m": "140"},
    )
    await events.add([trip, off])

    listed = await events.list(EventQuery(tenant, 0, 100))

    assert listed == [trip, off]
    assert [
        e for e in await events.unpublished(OUTBOX_PAGE) if e.tenant == tenant
    ] == listed
    assert await events.memberships(tenant) == []


def route_event(
    device: str, kind: EventType, time_ms: int, tenant: str, route_id: str
) -> TrackingEvent:
    return replace(event(device, kind, time_ms, tenant), fence_id="", route_id=route_id)


async def test_events_filter_by_route_and_page(geo_stores, tenant) -> None:
    """A route leaves out the other routes' events and those without a route; the
    next page goes on within the route."""
    _, events = geo_stores
    on_route = [
        route_event("d1", EventType.ETA_UPDATED, t, tenant, "r1") for t in (1, 3, 5)
    ]
    await events.add(
        [
            *on_route,
            route_event("d1", EventType.ETA_UPDATED, 2, tenant, "r2"),
            replace(event("d1", EventType.TRIP_STARTED, 4, tenant), fence_id=""),
            event("d1", EventType.ENTER, 6, tenant),
        ]
    )
    every_type = frozenset(EventType)
    page = await events.list(
        EventQuery(tenant, 0, 99, route_id="r1", limit=2, types=every_type)
    )
    after = (page[-1].time_ms, page[-1].event_id)
    rest = await events.list(
        EventQuery(tenant, 0, 99, route_id="r1", after=after, types=every_type)
    )
    assert page + rest == on_route
    assert await events.list(EventQuery(tenant, 0, 99, route_id="r3")) == []
