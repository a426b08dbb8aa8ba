"""The Route service on a real server on port 0 with the Helsinki datasets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import numpy as np
import polyline
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pyproj import Geod
from tracking.v1 import (
    common_pb2,
    event_pb2,
    geofence_pb2,
    geofence_pb2_grpc,
    route_pb2,
    route_pb2_grpc,
    track_pb2_grpc,
)

from tests.backends import BACKENDS, backend_settings, unique_tenant
from tests.routes import support
from tests.server_fixtures import (
    batch,
    embedded_settings,
    hello,
    now_ms,
    track_session,
    violation,
)

P = common_pb2.LatLng
GEOD = Geod(ellps="WGS84")
STATION, SENATE, KAMPPI = (
    P(lat=60.1702, lon=24.9401),
    P(lat=60.1750, lon=24.9502),
    P(lat=60.1690, lon=24.9330),
)
FAR = P(lat=60.175, lon=25.5)  # 30 km east of the extract
SERVICE = "tracking.v1.Route"


async def health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))
    return answer.status


async def test_without_dataset_route_is_not_serving_and_says_how_to_prepare(
    start_server,
) -> None:
    server = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await route_pb2_grpc.RouteStub(channel).ComputeRoute(
                route_pb2.ComputeRouteRequest(origin=STATION, destination=SENATE)
            )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tracking prepare-routing" in caught.value.details()
    assert "--small-component-size 50" in caught.value.details()
    assert "docs/routes.md" in caught.value.details()


async def test_route_is_serving_with_a_dataset(route_channel) -> None:
    assert await health(route_channel) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "profile",
    [
        pytest.param(route_pb2.ROUTING_PROFILE_CAR, id="car"),
        pytest.param(route_pb2.ROUTING_PROFILE_BICYCLE, id="bicycle"),
        pytest.param(route_pb2.ROUTING_PROFILE_FOOT, id="foot"),
    ],
)
async def test_route_geometry_agrees_with_its_distance(routes, profile) -> None:
    request = route_pb2.ComputeRouteRequest(
        origin=KAMPPI, destination=SENATE, profile=profile
    )
    plan = (await routes.ComputeRoute(request)).route
    lat, lon = np.array(polyline.decode(plan.polyline, 6)).T
    assert GEOD.line_length(lon, lat) == pytest.approx(plan.distance_m, rel=0.005)
    geojson = json.loads(plan.geojson)
    assert geojson["type"] == "LineString" and len(geojson["coordinates"]) == len(lat)
    assert plan.legs[0].steps[0].maneuver == "depart" and plan.duration_s > 0


async def test_expected_duration_is_in_tenths_of_a_second(routes) -> None:
    """With nothing learned the expected duration is the engine's; summed over
    segments it came out as 406.40000000000003 in JSON."""
    request = route_pb2.ComputeRouteRequest(origin=KAMPPI, destination=SENATE)
    plan = (await routes.ComputeRoute(request)).route
    assert plan.expected_duration_s == round(plan.duration_s, 1) > 0
    assert plan.expected_duration_s == round(plan.expected_duration_s, 1)


@pytest.mark.parametrize("query_id", ["R1", "R2"])
async def test_identical_start_and_end_is_a_zero_length_route(
    routes, field_cases, query_id
) -> None:
    case = field_cases["C24"]
    query = next(q for q in case["queries"] if q["id"] == query_id)
    # The case's point is in Minnesota; the same query is made at a Helsinki point.
    here = [STATION for _ in query["waypoints"]]
    request = route_pb2.ComputeRouteRequest(
        origin=here[0], destination=here[-1], waypoints=here[1:-1]
    )
    plan = (await routes.ComputeRoute(request)).route
    expected = case["expected"][query_id]
    assert (plan.distance_m, plan.duration_s) == (
        expected["distance_m"],
        expected["duration_s"],
    )
    assert len(plan.legs) == expected.get("legs", 1)


async def test_swapped_coordinates_are_invalid_argument(routes, field_cases) -> None:
    query = field_cases["C17"]["queries"][0]
    a, b = (P(lat=w["lat"], lon=w["lon"]) for w in query["waypoints"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await routes.ComputeRoute(
            route_pb2.ComputeRouteRequest(origin=a, destination=b)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("origin: lat 121.5086")


@pytest.mark.parametrize(
    ("points", "field"),
    [
        pytest.param((FAR, STATION), "origin", id="origin"),
        pytest.param((STATION, FAR, SENATE), "waypoints[0]", id="waypoint"),
        pytest.param((STATION, FAR), "destination", id="destination"),
    ],
)
async def test_point_far_from_roads_is_invalid_argument_saying_how_far(
    routes, points, field
) -> None:
    request = route_pb2.ComputeRouteRequest(
        origin=points[0], destination=points[-1], waypoints=points[1:-1]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await routes.ComputeRoute(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: 30340 m from the nearest road")


async def test_matrix_matches_single_routes(routes) -> None:
    points = [STATION, SENATE, KAMPPI]
    matrix = await routes.ComputeMatrix(route_pb2.ComputeMatrixRequest(points=points))
    durations = np.array(matrix.duration_s).reshape(matrix.rows, matrix.columns)
    for i, j in [(0, 1), (2, 1), (1, 2)]:
        request = route_pb2.ComputeRouteRequest(origin=points[i], destination=points[j])
        plan = (await routes.ComputeRoute(request)).route
        assert durations[i, j] == pytest.approx(plan.duration_s, rel=0.01)


async def test_matrix_of_one_point_is_one_zero(routes) -> None:
    request = route_pb2.ComputeMatrixRequest(points=[STATION])
    matrix = await routes.ComputeMatrix(request)
    assert (matrix.rows, matrix.columns) == (1, 1)
    assert (list(matrix.duration_s), list(matrix.distance_m)) == ([0.0], [0.0])
    assert len(matrix.sources) == len(matrix.destinations) == 1


async def test_optimisation_orders_stops_in_epoch_time(routes) -> None:
    start = now_ms()
    window = route_pb2.TimeWindow(start_ms=start, end_ms=start + 3_600_000)
    jobs = [
        route_pb2.Job(id="a", location=SENATE, service_s=60, time_windows=[window]),
        route_pb2.Job(id="b", location=KAMPPI, service_s=60, demand=[1]),
        route_pb2.Job(id="c", location=STATION, skills=["crane"]),
    ]
    van = route_pb2.Vehicle(id="van", start=STATION, end=STATION, capacity=[5])
    answer = await routes.OptimizeRoute(
        route_pb2.OptimizeRouteRequest(vehicles=[van], jobs=jobs, departure_ms=start)
    )
    stops = answer.routes[0].stops
    assert sorted(s.job_id for s in stops if s.job_id) == ["a", "b"]
    assert [s.arrival_ms for s in stops] == sorted(s.arrival_ms for s in stops)
    assert stops[0].arrival_ms == start
    assert answer.unassigned[0].job_id == "c" and "crane" in answer.unassigned[0].reason


@pytest.mark.parametrize(
    ("jobs", "field"),
    [
        pytest.param([], "jobs", id="no-jobs"),
        pytest.param(
            [
                route_pb2.Job(
                    id="a",
                    location=SENATE,
                    time_windows=[route_pb2.TimeWindow(start_ms=10, end_ms=5)],
                )
            ],
            "jobs[0].time_windows[0]",
            id="window-ends-before-it-starts",
        ),
    ],
)
async def test_bad_optimisation_names_the_field(routes, jobs, field) -> None:
    van = route_pb2.Vehicle(id="van", start=STATION)
    request = route_pb2.OptimizeRouteRequest(vehicles=[van], jobs=jobs)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await routes.OptimizeRoute(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")


INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
LATEST_MS = 253_370_764_800_000  # 9999-01-01
W = route_pb2.TimeWindow


def plan(
    departure_ms: int = 0,
    shift=None,
    service_s=0.0,
    window=None,
    capacity=(),
    demand=(),
):
    """A one-van, one-job plan request with one setting changed."""
    van = route_pb2.Vehicle(id="van", start=STATION, shift=shift, capacity=capacity)
    job = route_pb2.Job(
        id="a",
        location=SENATE,
        service_s=service_s,
        time_windows=[window] if window else [],
        demand=demand,
    )
    return route_pb2.OptimizeRouteRequest(
        vehicles=[van], jobs=[job], departure_ms=departure_ms
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        pytest.param(plan(service_s=1e300), "jobs[0].service_s", id="service-1e300"),
        pytest.param(plan(service_s=1e10), "jobs[0].service_s", id="service-300-years"),
        pytest.param(plan(service_s=-1), "jobs[0].service_s", id="service-negative"),
        pytest.param(
            plan(service_s=float("inf")), "jobs[0].service_s", id="service-infinite"
        ),
        pytest.param(
            plan(capacity=[INT64_MAX], demand=[1]),
            "vehicles[0].capacity",
            id="capacity-int64-max",
        ),
        pytest.param(
            plan(capacity=[10], demand=[2**31]),
            "jobs[0].demand",
            id="demand-past-int32",
        ),
        pytest.param(
            plan(capacity=[10], demand=[-1]), "jobs[0].demand", id="demand-negative"
        ),
        pytest.param(plan(INT64_MAX), "departure_ms", id="departure-int64-max"),
        pytest.param(plan(INT64_MIN), "departure_ms", id="departure-int64-min"),
        pytest.param(plan(-1), "departure_ms", id="departure-negative"),
        pytest.param(plan(LATEST_MS + 1), "departure_ms", id="departure-past-9999"),
        pytest.param(
            plan(shift=W(start_ms=INT64_MIN, end_ms=0)),
            "vehicles[0].shift.start_ms",
            id="shift-int64-min",
        ),
        pytest.param(
            plan(shift=W(start_ms=0, end_ms=INT64_MAX)),
            "vehicles[0].shift.end_ms",
            id="shift-end-int64-max",
        ),
        pytest.param(
            plan(window=W(start_ms=0, end_ms=INT64_MAX)),
            "jobs[0].time_windows[0].end_ms",
            id="window-end-int64-max",
        ),
        pytest.param(
            plan(window=W(start_ms=-5, end_ms=5)),
            "jobs[0].time_windows[0].start_ms",
            id="window-negative",
        ),
        pytest.param(
            plan(1_700_000_000_000, window=W(start_ms=LATEST_MS, end_ms=LATEST_MS)),
            "jobs[0].time_windows[0].start_ms",
            id="window-beyond-the-horizon",
        ),
    ],
)
async def test_optimisation_bounds_times_and_service(routes, request_, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await routes.OptimizeRoute(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")


async def test_a_shift_open_to_the_latest_time_plans_from_its_start(routes) -> None:
    start = now_ms()
    request = plan(shift=W(start_ms=start, end_ms=LATEST_MS), service_s=86_400)
    answer = await routes.OptimizeRoute(request)
    stops = answer.routes[0].stops
    assert stops[0].arrival_ms == start
    assert [s.job_id for s in stops if s.job_id] == ["a"]


async def test_job_window_long_past_leaves_the_job_unassigned(routes) -> None:
    """A window given in seconds instead of milliseconds lies in January 1970: the
    job cannot be served, and the vehicle's default shift stays valid."""
    start = now_ms()
    seconds = route_pb2.TimeWindow(start_ms=start // 1000, end_ms=start // 1000 + 3600)
    jobs = [
        route_pb2.Job(id="late", location=SENATE, time_windows=[seconds]),
        route_pb2.Job(id="any", location=KAMPPI),
    ]
    van = route_pb2.Vehicle(id="van", start=STATION)
    answer = await routes.OptimizeRoute(
        route_pb2.OptimizeRouteRequest(vehicles=[van], jobs=jobs, departure_ms=start)
    )
    assert [s.job_id for s in answer.routes[0].stops if s.job_id] == ["any"]
    assert answer.routes[0].stops[0].arrival_ms == start
    assert [u.job_id for u in answer.unassigned] == ["late"]


async def test_match_track_snaps_a_noisy_drive(routes) -> None:
    plan = (
        await routes.ComputeRoute(
            route_pb2.ComputeRouteRequest(origin=KAMPPI, destination=SENATE)
        )
    ).route
    lat, lon = np.array(polyline.decode(plan.polyline, 6)).T
    points, _ = support.drive(lat, lon, 10.0)
    noisy = support.jitter(points, 6.0, seed=1)
    start = now_ms() - 3_600_000
    fixes = [
        common_pb2.Fix(seq=i + 1, time_ms=start + i * 5000, lat=a, lon=b, accuracy_m=10)
        for i, (a, b) in enumerate(noisy.tolist())
    ]
    answer = await routes.MatchTrack(route_pb2.MatchTrackRequest(fixes=fixes))
    assert answer.matched_share > 0.7 and answer.confidence > 0.5
    assert answer.matched_distance_m == pytest.approx(plan.distance_m, rel=0.05)
    assert len(answer.points) == len(fixes)


async def test_assigned_route_raises_events_on_the_device_stream(
    routes, tracks
) -> None:
    assigned = await routes.AssignRoute(
        route_pb2.AssignRouteRequest(
            device_id="van-7",
            route_id="delivery-1",
            route=route_pb2.ComputeRouteRequest(origin=KAMPPI, destination=SENATE),
        )
    )
    lat, lon = np.array(polyline.decode(assigned.route.polyline, 6)).T
    points, along = support.drive(lat, lon, 10.0)
    rows = np.flatnonzero((along > 600) & (along < 900))
    points = support.shift(points, rows, 0.0, 300.0)
    kinds = await drive_on_stream(tracks, "van-7", points)
    assert [k for k in kinds if k != event_pb2.EVENT_TYPE_ETA_UPDATED] == [
        event_pb2.EVENT_TYPE_OFF_ROUTE,
        event_pb2.EVENT_TYPE_BACK_ON_ROUTE,
        event_pb2.EVENT_TYPE_ARRIVED,
    ]
    progress = await routes.GetRouteProgress(
        route_pb2.GetRouteProgressRequest(device_id="van-7")
    )
    assert progress.progress.arrived and progress.progress.route_id == "delivery-1"


EVERY_TYPE = [t for t in event_pb2.EventType.values() if t]
OFF_AND_BACK = [
    event_pb2.EVENT_TYPE_OFF_ROUTE,
    event_pb2.EVENT_TYPE_BACK_ON_ROUTE,
    event_pb2.EVENT_TYPE_ARRIVED,
]


async def test_a_detour_ending_at_the_destination_is_back_on_route_before_arriving(
    routes, tracks
) -> None:
    """Off the route until the last fix, which is at the destination: the route
    processor closes the detour with BACK_ON_ROUTE, then ARRIVED."""
    assigned = await routes.AssignRoute(
        route_pb2.AssignRouteRequest(
            device_id="van-8",
            route_id="delivery-2",
            route=route_pb2.ComputeRouteRequest(origin=KAMPPI, destination=SENATE),
        )
    )
    lat, lon = np.array(polyline.decode(assigned.route.polyline, 6)).T
    points, along = support.drive(lat, lon, 10.0)
    rows = np.flatnonzero(along > along[-1] - 400)[:-1]  # all but the last fix
    points = support.shift(points, rows, 0.0, 300.0)
    kinds = await drive_on_stream(tracks, "van-8", points)
    assert [k for k in kinds if k != event_pb2.EVENT_TYPE_ETA_UPDATED] == OFF_AND_BACK


async def drive_off_route(
    channel: grpc.aio.Channel, device: str, route_id: str
) -> None:
    """Assign ``route_id`` to ``device`` and drive it, 300 m off the route for a
    while, to the end: OFF_ROUTE, BACK_ON_ROUTE and ARRIVED, with ETA updates."""
    assigned = await route_pb2_grpc.RouteStub(channel).AssignRoute(
        route_pb2.AssignRouteRequest(
            device_id=device,
            route_id=route_id,
            route=route_pb2.ComputeRouteRequest(origin=KAMPPI, destination=SENATE),
        )
    )
    lat, lon = np.array(polyline.decode(assigned.route.polyline, 6)).T
    points, along = support.drive(lat, lon, 10.0)
    rows = np.flatnonzero((along > 600) & (along < 900))
    points = support.shift(points, rows, 0.0, 300.0)
    await drive_on_stream(track_pb2_grpc.TrackSessionStub(channel), device, points)


async def every_page(
    fences: geofence_pb2_grpc.GeofenceStub, first: geofence_pb2.ListEventsRequest
) -> list[event_pb2.Event]:
    """The events of every page from ``first`` on, following the page tokens."""
    request = geofence_pb2.ListEventsRequest()
    request.CopyFrom(first)
    events: list[event_pb2.Event] = []
    while True:
        page = await fences.ListEvents(request)
        events.extend(page.events)
        if not page.next_page_token:
            return events
        request.page_token = page.next_page_token


@pytest.fixture(params=BACKENDS)
async def on_backend(
    request, start_server, helsinki_dir, tmp_path
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a server with the Helsinki datasets on each backend, for a
    tenant of the test's own."""
    settings = embedded_settings(
        tmp_path, routing_data_dir=str(helsinki_dir), default_tenant=unique_tenant()
    )
    server = await start_server(settings=backend_settings(request, settings))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


async def test_route_events_reach_watch_events_and_list_events(on_backend) -> None:
    fences = geofence_pb2_grpc.GeofenceStub(on_backend)
    wanted = [
        event_pb2.EVENT_TYPE_OFF_ROUTE,
        event_pb2.EVENT_TYPE_BACK_ON_ROUTE,
        event_pb2.EVENT_TYPE_ARRIVED,
    ]
    request = geofence_pb2.WatchEventsRequest(types=wanted, device_ids=["van-8"])
    watch = fences.WatchEvents(request)
    await watch.initial_metadata()  # subscribed
    await drive_off_route(on_backend, "van-8", "delivery-2")
    watched: list[event_pb2.Event] = []
    async with asyncio.timeout(30):
        while len(watched) < len(wanted):
            watched.extend((await watch.read()).events)
    watch.cancel()
    listed: list[event_pb2.Event] = []
    async with asyncio.timeout(30):
        while len(listed) < len(wanted):
            request = geofence_pb2.ListEventsRequest(
                start_ms=0, device_id="van-8", types=wanted
            )
            listed = list((await fences.ListEvents(request)).events)

    assert [e.type for e in watched] == wanted
    assert listed == watched  # stored as delivered
    assert {e.route_id for e in listed} == {"delivery-2"}
    assert float(listed[0].attributes["deviation_m"]) > 50  # route_off_route_m


async def test_route_filter_leaves_out_other_routes_and_events_without_one(
    on_backend,
) -> None:
    fences = geofence_pb2_grpc.GeofenceStub(on_backend)
    request = geofence_pb2.WatchEventsRequest(
        types=EVERY_TYPE, route_ids=["delivery-3"]
    )
    watch = fences.WatchEvents(request)
    await watch.initial_metadata()  # subscribed
    await drive_off_route(on_backend, "van-10", "delivery-4")  # raised first
    await drive_off_route(on_backend, "van-9", "delivery-3")
    watched: list[event_pb2.Event] = []
    async with asyncio.timeout(30):
        while event_pb2.EVENT_TYPE_ARRIVED not in [e.type for e in watched]:
            watched.extend((await watch.read()).events)
    watch.cancel()
    on_route = geofence_pb2.ListEventsRequest(
        start_ms=0, route_id="delivery-3", types=EVERY_TYPE, page_size=2
    )
    listed: list[event_pb2.Event] = []
    async with asyncio.timeout(30):  # the event store writes in the background
        while event_pb2.EVENT_TYPE_ARRIVED not in [e.type for e in listed]:
            await asyncio.sleep(0.1)
            listed = await every_page(fences, on_route)
    every_route = geofence_pb2.ListEventsRequest(
        start_ms=0, types=EVERY_TYPE, page_size=1000
    )
    stored = (await fences.ListEvents(every_route)).events
    untyped = geofence_pb2.ListEventsRequest(start_ms=0, route_id="delivery-3")
    by_route_alone = (await fences.ListEvents(untyped)).events

    assert {(e.device_id, e.route_id) for e in watched} == {("van-9", "delivery-3")}
    kinds = [e.type for e in watched if e.type != event_pb2.EVENT_TYPE_ETA_UPDATED]
    assert kinds == OFF_AND_BACK
    assert len(listed) > on_route.page_size  # more than one page
    assert sorted(e.event_id for e in listed) == sorted(e.event_id for e in watched)
    # what the filter left out: the other route's events and activity events
    assert {e.route_id for e in stored} == {"", "delivery-3", "delivery-4"}
    # a route named without types: its route events (the geofence types matched none)
    assert sorted(e.event_id for e in by_route_alone) == sorted(
        e.event_id for e in listed
    )


async def test_cleared_route_has_no_progress(routes) -> None:
    route = route_pb2.ComputeRouteRequest(origin=KAMPPI, destination=SENATE)
    await routes.AssignRoute(route_pb2.AssignRouteRequest(device_id="d", route=route))
    assert (await routes.ClearRoute(route_pb2.ClearRouteRequest(device_id="d"))).cleared
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await routes.GetRouteProgress(route_pb2.GetRouteProgressRequest(device_id="d"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def drive_on_stream(tracks, device: str, points: np.ndarray) -> list[int]:
    """Send the drive in batches of 10 fixes; the route events the stream brings."""
    start = now_ms() - 5_000 * len(points) - 60_000
    call = tracks.Track()
    await call.write(hello(device, want_events=True))
    await call.read()
    kinds = []
    for first in range(0, len(points), 10):
        fixes = [
            common_pb2.Fix(
                seq=i + 1, time_ms=start + i * 5000, lat=a, lon=b, accuracy_m=5
            )
            for i, (a, b) in enumerate(points[first : first + 10].tolist(), first)
        ]
        await call.write(batch(fixes))
    while event_pb2.EVENT_TYPE_ARRIVED not in kinds:
        response = await asyncio.wait_for(call.read(), 10)
        event = response.event if response.WhichOneof("message") == "event" else None
        if event is not None and event.route_id:  # other processors' events too
            kinds.append(event.type)
    await call.done_writing()
    return kinds


async def test_match_track_reads_a_devices_stored_history(routes, tracks) -> None:
    plan = (
        await routes.ComputeRoute(
            route_pb2.ComputeRouteRequest(origin=STATION, destination=SENATE)
        )
    ).route
    lat, lon = np.array(polyline.decode(plan.polyline, 6)).T
    points, _ = support.drive(lat, lon, 8.0)
    start = now_ms() - 600_000
    fixes = [
        common_pb2.Fix(seq=i + 1, time_ms=start + i * 5000, lat=a, lon=b, accuracy_m=5)
        for i, (a, b) in enumerate(points.tolist())
    ]
    await track_session(tracks, "bike-3", [fixes])
    answer = await routes.MatchTrack(
        route_pb2.MatchTrackRequest(device_id="bike-3", start_ms=start, end_ms=now_ms())
    )
    assert len(answer.points) == len(fixes)
    assert answer.matched_distance_m == pytest.approx(plan.distance_m, rel=0.05)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        pytest.param({}, "fixes", id="empty"),
        pytest.param(
            {"device_id": "x", "start_ms": 5, "end_ms": 5}, "end_ms", id="range"
        ),
    ],
)
async def test_match_track_checks_its_input(routes, request_fields, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await routes.MatchTrack(route_pb2.MatchTrackRequest(**request_fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:")


async def test_match_track_of_a_device_without_fixes_names_the_device(routes) -> None:
    request = route_pb2.MatchTrackRequest(
        device_id="nobody", start_ms=now_ms() - 60_000, end_ms=now_ms()
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await routes.MatchTrack(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found, description = violation(caught.value)
    assert found == "device_id" and "has 0 stored fixes" in description


def match_fixes(times: list[int], **extra) -> list[common_pb2.Fix]:
    return [
        common_pb2.Fix(seq=k + 1, time_ms=t, lat=60.17 + k * 1e-4, lon=24.94, **extra)
        for k, t in enumerate(times)
    ]


def with_accuracy(
    fixes: list[common_pb2.Fix], index: int, accuracy_m: float
) -> list[common_pb2.Fix]:
    fixes[index].accuracy_m = accuracy_m
    return fixes


NOW_MS = 1_700_000_000_000


@pytest.mark.parametrize(
    ("fixes", "field", "words"),
    [
        pytest.param(
            match_fixes([INT64_MIN, INT64_MAX]),
            "fixes[0].time_ms",
            "epoch milliseconds",
            id="int64-extremes",
        ),
        pytest.param(
            match_fixes([NOW_MS, INT64_MAX]),
            "fixes[1].time_ms",
            "epoch milliseconds",
            id="int64-max",
        ),
        pytest.param(
            match_fixes([-1, NOW_MS]),
            "fixes[0].time_ms",
            "epoch milliseconds",
            id="negative-time",
        ),
        pytest.param(
            match_fixes([NOW_MS, NOW_MS + 1000], accuracy_m=-5),
            "fixes[0].accuracy_m",
            "-5 must be in [0, 1000000] (1000 km)",
            id="negative-accuracy",
        ),
        pytest.param(
            match_fixes([NOW_MS, NOW_MS + 1000], accuracy_m=float("inf")),
            "fixes[0].accuracy_m",
            "must be in [0, 1000000] (1000 km)",
            id="infinite-accuracy",
        ),
        pytest.param(
            with_accuracy(match_fixes([NOW_MS + k * 1000 for k in range(5)]), 3, 1e30),
            "fixes[3].accuracy_m",
            "must be in [0, 1000000] (1000 km)",
            id="accuracy-beyond-ingest-limit",
        ),
        pytest.param(
            with_accuracy(match_fixes([NOW_MS, NOW_MS + 1000]), 1, 1_000_001.0),
            "fixes[1].accuracy_m",
            "must be in [0, 1000000] (1000 km)",
            id="accuracy-just-over-1000-km",
        ),
        pytest.param(
            with_accuracy(match_fixes([NOW_MS, NOW_MS + 1000]), 1, float("-inf")),
            "fixes[1].accuracy_m",
            "-inf must be in [0, 1000000] (1000 km)",
            id="minus-infinite-accuracy",
        ),
        pytest.param(
            match_fixes([NOW_MS + 1000, NOW_MS]),
            "fixes",
            "fix times must not decrease",
            id="decreasing",
        ),
    ],
)
async def test_match_track_checks_fix_times_and_accuracy(
    routes, fixes, field, words
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await routes.MatchTrack(route_pb2.MatchTrackRequest(fixes=fixes))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found, description = violation(caught.value)
    assert found == field and words in description


@pytest.mark.parametrize(
    "accuracy_m",
    [
        pytest.param(float("nan"), id="nan-not-given"),
        pytest.param(-0.0, id="minus-zero"),
        pytest.param(1_000_000.0, id="1000-km"),
    ],
)
async def test_match_track_takes_the_accuracies_ingest_takes(
    routes, accuracy_m
) -> None:
    """NaN is an accuracy not given, as at ingest; the bounds are inclusive."""
    fixes = with_accuracy(match_fixes([NOW_MS, NOW_MS + 1000]), 1, accuracy_m)
    answer = await routes.MatchTrack(route_pb2.MatchTrackRequest(fixes=fixes))
    assert len(answer.points) == len(fixes)


@pytest.mark.parametrize(
    ("start_ms", "end_ms", "field"),
    [
        pytest.param(INT64_MIN, NOW_MS, "start_ms", id="start-int64-min"),
        pytest.param(NOW_MS, INT64_MAX, "end_ms", id="end-int64-max"),
        pytest.param(NOW_MS, NOW_MS - 1, "end_ms", id="inverted"),
        pytest.param(0, NOW_MS, "end_ms", id="decades"),
    ],
)
async def test_match_track_by_device_bounds_its_range(
    routes, start_ms, end_ms, field
) -> None:
    """A device's stored track is matched over a range the History RPCs would
    take: from 0, up to 9999-01-01, at most 366 days."""
    request = route_pb2.MatchTrackRequest(
        device_id="van", start_ms=start_ms, end_ms=end_ms
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await routes.MatchTrack(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(caught.value)[0] == field


@pytest.mark.parametrize(
    ("route_id", "words"),
    [
        pytest.param("\0" * 1000, "longer than 128 characters", id="thousand-nuls"),
        pytest.param(
            "r\0",
            "has a character that is not printable",
            id="nul",
        ),
        pytest.param(
            "r\n1",
            "has a character that is not printable",
            id="newline",
        ),
        pytest.param("r" * 100_000, "longer than 128 characters", id="100k-chars"),
        pytest.param("   ", "must not be empty or only spaces", id="spaces"),
    ],
)
async def test_assign_route_checks_the_route_id_like_a_device_id(
    routes, route_id, words
) -> None:
    route = route_pb2.ComputeRouteRequest(origin=KAMPPI, destination=SENATE)
    request = route_pb2.AssignRouteRequest(
        device_id="d", route_id=route_id, route=route
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await routes.AssignRoute(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(caught.value) == ("route_id", words)


async def test_a_coarse_caller_sees_progress_and_eta_no_finer_than_its_grid(
    start_server, helsinki_dir
) -> None:
    """With auth off, ``default_precision_m`` limits every caller: the progress on a
    route and the ETA must not place the device finer than the grid."""
    server = await start_server(
        routing_data_dir=str(helsinki_dir), default_precision_m=1_000.0
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        routes = route_pb2_grpc.RouteStub(channel)
        assigned = await routes.AssignRoute(
            route_pb2.AssignRouteRequest(
                device_id="van-9",
                route=route_pb2.ComputeRouteRequest(origin=KAMPPI, destination=SENATE),
            )
        )
        lat, lon = np.array(polyline.decode(assigned.route.polyline, 6)).T
        points, along = support.drive(lat, lon, 10.0)
        part = points[along < 450]  # under half way: not arrived
        start = now_ms() - 5_000 * len(part) - 60_000
        fixes = [
            common_pb2.Fix(seq=i + 1, time_ms=start + i * 5000, lat=a, lon=b)
            for i, (a, b) in enumerate(part.tolist())
        ]
        tracks = track_pb2_grpc.TrackSessionStub(channel)
        _, acks = await track_session(tracks, "van-9", [fixes])
        assert acks[0].stored == len(fixes)
        async with asyncio.timeout(20):
            while True:
                answer = await routes.GetRouteProgress(
                    route_pb2.GetRouteProgressRequest(device_id="van-9")
                )
                progress = answer.progress
                if progress.last_fix_ms == fixes[-1].time_ms:
                    break
                await asyncio.sleep(0.1)
    assert progress.progress_m % 1_000 == 0 and progress.remaining_m % 1_000 == 0
    assert progress.eta_ms > progress.last_fix_ms
    assert (progress.eta_ms - progress.last_fix_ms) % 100_000 == 0
