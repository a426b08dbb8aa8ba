"""Precision controls through a real server, on the embedded and the production
backends: a caller whose token says ``precision_m`` (or, without the claim, the
server's ``default_precision_m``) reads every position snapped to the grid, while
fixes are stored exactly."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tracking.v1 import (
    common_pb2,
    history_pb2,
    track_pb2,
)

from tests.backends import BACKENDS, backend_settings
from tests.conftest import TRACES, require_shared
from tests.server_fixtures import TenantStubs, bearer, embedded_settings, now_ms
from tracking_grpc.core.precision import snap
from tracking_grpc.server import TrackingServer
from tracking_grpc.traces import Trace, read_trace

SECRET = "precision-test-secret-of-enough-length"
CELL_M = 1_000.0
BUS = "liverpool_bus_route14_outbound.csv"


@pytest.fixture(params=BACKENDS)
async def served(
    request: pytest.FixtureRequest, start_server, tmp_path: Path
) -> AsyncIterator[tuple[TrackingServer, TenantStubs]]:
    settings = embedded_settings(tmp_path, auth_mode="jwt", jwt_hs256_secret=SECRET)
    server = await start_server(settings=backend_settings(request, settings))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, TenantStubs(channel, SECRET, CELL_M)


@pytest.fixture(scope="module")
def bus() -> Trace:
    """The Liverpool bus trace (five buses on route 14)."""
    return read_trace(require_shared(TRACES / BUS))


async def publish(
    stubs: TenantStubs, trace: Trace, device: str, fixes: int = 120
) -> int:
    """The device's last ``fixes`` fixes, replayed to end a second ago, with 5 m of
    accuracy; returns the fix time of the first."""
    rows = np.flatnonzero(trace.device == device)[-fixes:]
    times = trace.time_ms[rows] - trace.time_ms[rows[-1]] + now_ms() - 1_000
    columns = track_pb2.ColumnarFixes(
        device_ids=[device],
        device_index=[0] * len(rows),
        seq=list(range(1, len(rows) + 1)),
        time_ms=times.tolist(),
        lat=trace.lat[rows].tolist(),
        lon=trace.lon[rows].tolist(),
        accuracy_m=[5.0] * len(rows),
        heading_deg=np.nan_to_num(trace.heading_deg[rows], nan=90.0).tolist(),
    )
    answer = await stubs.track.PublishBatch(
        track_pb2.PublishBatchRequest(columns=columns), metadata=stubs.admin
    )
    assert answer.stored == len(rows)
    return int(times[0])


def assert_coarse(coarse: common_pb2.Position, exact: common_pb2.Position) -> None:
    """The coarse position is the exact one's cell centre, no more accurate than
    its cell, with no speed, heading or altitude."""
    lat, lon, bound = snap([exact.lat], [exact.lon], CELL_M)
    assert (coarse.lat, coarse.lon) == (lat[0], lon[0])
    assert (coarse.lat, coarse.lon) != (exact.lat, exact.lon)
    assert coarse.accuracy_m == pytest.approx(bound[0] + exact.accuracy_m, rel=1e-6)
    assert not coarse.HasField("heading_deg") and exact.HasField("heading_deg")


async def last(
    stubs: TenantStubs, metadata, *devices: str
) -> list[common_pb2.Position]:
    request = track_pb2.GetLastPositionsRequest(device_ids=list(devices))
    answer = await stubs.track.GetLastPositions(request, metadata=metadata)
    return list(answer.positions)


async def test_last_positions_are_cell_centres(served, bus) -> None:
    server, stubs = served
    await publish(stubs, bus, "4716")

    (exact,) = await last(stubs, stubs.exact, "4716")
    (coarse,) = await last(stubs, stubs.coarse, "4716")

    assert_coarse(coarse, exact)
    stored = await server.app.history.history(stubs.tenant, "4716", 0, now_ms(), 1_000)
    assert (stored.lat[-1], stored.lon[-1]) == (exact.lat, exact.lon)


async def test_nearby_measures_from_cell_centres(served, bus) -> None:
    _, stubs = served
    await publish(stubs, bus, "4716")
    (exact,) = await last(stubs, stubs.exact, "4716")
    (coarse,) = await last(stubs, stubs.coarse, "4716")

    async def nearby(lat: float, lon: float, radius_m: float, metadata):
        request = track_pb2.NearbyRequest(
            center=common_pb2.LatLng(lat=lat, lon=lon), radius_m=radius_m
        )
        return list((await stubs.track.Nearby(request, metadata=metadata)).devices)

    # A tiny circle on the exact position finds the bus for an exact caller only.
    assert len(await nearby(exact.lat, exact.lon, 1.0, stubs.exact)) == 1
    assert await nearby(exact.lat, exact.lon, 1.0, stubs.coarse) == []
    (found,) = await nearby(coarse.lat, coarse.lon, 1.0, stubs.coarse)
    assert found.distance_m == 0.0
    assert found.position == coarse


async def test_nearby_ties_in_one_cell_go_by_device_id(served, bus) -> None:
    """Two devices in one cell are equally far for a coarse caller: the exact
    distance order does not show through."""
    _, stubs = served
    await publish(stubs, bus, "4716", fixes=1)
    (bus_position,) = await last(stubs, stubs.exact, "4716")
    center_lat, center_lon, _ = snap([bus_position.lat], [bus_position.lon], CELL_M)
    # "a-far" shares the bus's place; "zz-nearest" sits on the cell centre, the
    # nearest of the three, but its id sorts last.
    places = {
        "a-far": (bus_position.lat, bus_position.lon),
        "zz-nearest": (float(center_lat[0]), float(center_lon[0])),
    }
    for device, (lat, lon) in places.items():
        columns = track_pb2.ColumnarFixes(
            device_ids=[device],
            device_index=[0],
            seq=[1],
            time_ms=[now_ms() - 500],
            lat=[lat],
            lon=[lon],
        )
        await stubs.track.PublishBatch(
            track_pb2.PublishBatchRequest(columns=columns), metadata=stubs.admin
        )
    request = track_pb2.NearbyRequest(
        center=common_pb2.LatLng(lat=center_lat[0], lon=center_lon[0]),
        radius_m=10.0,
    )

    exact = await stubs.track.Nearby(request, metadata=stubs.exact)
    coarse = await stubs.track.Nearby(request, metadata=stubs.coarse)

    assert [d.position.device_id for d in exact.devices] == ["zz-nearest"]
    names = [d.position.device_id for d in coarse.devices]
    assert names == ["4716", "a-far", "zz-nearest"]
    assert {d.distance_m for d in coarse.devices} == {0.0}


async def first_watch(stubs: TenantStubs, area: common_pb2.Area, metadata):
    """The positions of a Watch's snapshot, and the watch call, still open."""
    call = stubs.track.Watch(track_pb2.WatchRequest(area=area), metadata=metadata)
    positions = []
    while True:
        response = await asyncio.wait_for(call.read(), 10)
        assert response is not grpc.aio.EOF, "the watch ended before its snapshot"
        positions += list(response.positions)
        if response.snapshot_done:
            return positions, call


def box_around(lat: float, lon: float, half_deg: float) -> common_pb2.Area:
    return common_pb2.Area(
        box=common_pb2.BoundingBox(
            south=lat - half_deg,
            west=lon - half_deg,
            north=lat + half_deg,
            east=lon + half_deg,
        )
    )


async def test_watch_matches_areas_against_cell_centres(served, bus) -> None:
    _, stubs = served
    await publish(stubs, bus, "4716")
    (exact,) = await last(stubs, stubs.exact, "4716")
    (coarse,) = await last(stubs, stubs.coarse, "4716")
    tiny = box_around(exact.lat, exact.lon, 1e-5)  # about a metre: not its centre

    seen_exact, call_exact = await first_watch(stubs, tiny, stubs.exact)
    seen_coarse, call_coarse = await first_watch(stubs, tiny, stubs.coarse)
    call_exact.cancel()
    call_coarse.cancel()
    around_cell, call = await first_watch(
        stubs, box_around(coarse.lat, coarse.lon, 1e-5), stubs.coarse
    )

    assert [p.device_id for p in seen_exact] == ["4716"]
    assert seen_coarse == []
    assert around_cell == [coarse]
    call.cancel()


async def test_watch_updates_are_coarse(served, bus) -> None:
    _, stubs = served
    await publish(stubs, bus, "4716", fixes=1)
    area = box_around(53.42, -2.95, 0.5)  # the bus's part of Liverpool
    _, call = await first_watch(stubs, area, stubs.coarse)

    await publish_more(stubs, bus)
    update = await asyncio.wait_for(call.read(), 10)
    (exact,) = await last(stubs, stubs.exact, "4716")

    assert [p.device_id for p in update.positions] == ["4716"]
    assert_coarse(update.positions[0], exact)
    call.cancel()


async def publish_more(stubs: TenantStubs, bus: Trace) -> None:
    """The bus's first fix of the trace, as its next fix (seq 2), now."""
    row = int(np.flatnonzero(bus.device == "4716")[0])
    columns = track_pb2.ColumnarFixes(
        device_ids=["4716"],
        device_index=[0],
        seq=[2],
        time_ms=[now_ms()],
        lat=[float(bus.lat[row])],
        lon=[float(bus.lon[row])],
        accuracy_m=[5.0],
        heading_deg=[45.0],
    )
    await stubs.track.PublishBatch(
        track_pb2.PublishBatchRequest(columns=columns), metadata=stubs.admin
    )


async def track_of(stubs: TenantStubs, request, metadata) -> list[common_pb2.Position]:
    answers = stubs.history.GetTrack(request, metadata=metadata)
    return [p async for answer in answers for p in answer.positions]


async def test_track_and_export_show_only_cell_centres(served, bus) -> None:
    _, stubs = served
    start_ms = await publish(stubs, bus, "4716")
    track = history_pb2.GetTrackRequest(
        device_id="4716", start_ms=start_ms, end_ms=now_ms() + 1
    )

    exact = await track_of(stubs, track, stubs.exact)
    coarse = await track_of(stubs, track, stubs.coarse)
    export = history_pb2.ExportTrackRequest(
        track=track, format=history_pb2.EXPORT_FORMAT_CSV
    )
    text = b"".join(
        [r.data async for r in stubs.history.ExportTrack(export, metadata=stubs.coarse)]
    ).decode()

    assert len(coarse) == len(exact) == 120
    for c, e in zip(coarse, exact, strict=True):
        assert_coarse(c, e)
    assert all(f"{e.lat:.5f}" not in text for e in exact)
    assert f"{coarse[0].lat:.5f}" in text


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(-1, id="negative"),
        pytest.param("100", id="string"),
        pytest.param(True, id="boolean"),
        pytest.param(2e6, id="beyond-1000-km"),
        pytest.param(math.nan, id="nan"),
        pytest.param(10**400, id="huge-integer"),
        pytest.param(1e-310, id="below-a-metre"),
        pytest.param(0.5, id="half-a-metre"),
    ],
)
async def test_a_bad_precision_claim_is_unauthenticated(served, value) -> None:
    _, stubs = served
    request = track_pb2.GetLastPositionsRequest(device_ids=["4716"])

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stubs.track.GetLastPositions(
            request, metadata=bearer(SECRET, stubs.tenant, precision_m=value)
        )

    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    details = raised.value.details() or ""
    assert "precision_m" in details and len(details) < 200


async def test_default_precision_applies_without_a_claim(start_server, bus) -> None:
    server = await start_server(
        auth_mode="jwt", jwt_hs256_secret=SECRET, default_precision_m=CELL_M
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stubs = TenantStubs(channel, SECRET, CELL_M)
        await publish(stubs, bus, "4716")

        (exact,) = await last(stubs, stubs.exact, "4716")  # a claim of 0 overrides it
        (coarse,) = await last(stubs, bearer(SECRET, stubs.tenant), "4716")

    assert_coarse(coarse, exact)


def visits(start_ms: int) -> track_pb2.ColumnarFixes:
    """A car parked at A (15 min), driven 2 km north to B (10 min parked), back to
    A (15 min), then away: a fix every 20 s, parked fixes jittering by up to 12 m,
    so that each stop's fixes fall in several cells of a fine grid."""
    rng = np.random.default_rng(7)
    home, away = (53.40, -2.98), (53.418, -2.98)
    legs: list[tuple[tuple[float, float], tuple[float, float], int, bool]] = [
        (home, home, 45, True),
        (home, away, 10, False),
        (away, away, 30, True),
        (away, home, 10, False),
        (home, home, 45, True),
        (home, away, 10, False),
    ]
    lat: list[float] = []
    lon: list[float] = []
    for (lat0, lon0), (lat1, lon1), count, parked in legs:
        part = np.linspace(0.0, 1.0, count, endpoint=False)
        along_lat, along_lon = lat0 + (lat1 - lat0) * part, lon0 + (lon1 - lon0) * part
        if parked:
            along_lat = along_lat + rng.uniform(-1e-4, 1e-4, count)
            along_lon = along_lon + rng.uniform(-1.5e-4, 1.5e-4, count)
        lat += along_lat.tolist()
        lon += along_lon.tolist()
    return track_pb2.ColumnarFixes(
        device_ids=["car"],
        device_index=[0] * len(lat),
        seq=list(range(1, len(lat) + 1)),
        time_ms=[start_ms + 20_000 * i for i in range(len(lat))],
        lat=lat,
        lon=lon,
        accuracy_m=[5.0] * len(lat),
    )


def on_grid(point: common_pb2.LatLng, precision_m: float) -> bool:
    lat, lon, _ = snap([point.lat], [point.lon], precision_m)
    return (point.lat, point.lon) == (lat[0], lon[0])


async def test_stop_and_place_centres_are_cell_centres(served) -> None:
    """A stop's centre and a frequent place's are derived from many fixes; for a
    coarse caller they are cell centres too (an average of several cells' centres
    would lie between them, finer than the grid), and a stop's radius is a whole
    number of cells."""
    _, stubs = served
    fine_m = 20.0
    fine = bearer(SECRET, stubs.tenant, precision_m=fine_m)
    start_ms = now_ms() - 3 * 3_600_000
    answer = await stubs.track.PublishBatch(
        track_pb2.PublishBatchRequest(columns=visits(start_ms)), metadata=stubs.admin
    )
    assert answer.stored == 150
    span = {"device_id": "car", "start_ms": start_ms, "end_ms": now_ms()}

    async def stops(metadata) -> list[history_pb2.Stop]:
        request = history_pb2.ListStopsRequest(**span)
        return list((await stubs.history.ListStops(request, metadata=metadata)).stops)

    async def places(metadata) -> list[history_pb2.FrequentPlace]:
        request = history_pb2.FrequentPlacesRequest(**span, place_radius_m=200)
        answer = await stubs.history.FrequentPlaces(request, metadata=metadata)
        return list(answer.places)

    exact_stops, coarse_stops = await stops(stubs.exact), await stops(fine)
    assert len(exact_stops) == len(coarse_stops) == 3
    assert not any(on_grid(s.center, fine_m) for s in exact_stops)
    for stop in coarse_stops:
        assert on_grid(stop.center, fine_m)
        assert stop.radius_m % fine_m == 0
    coarse_places = await places(fine)
    assert [p.visit_count for p in coarse_places] == [2, 1]
    assert all(on_grid(p.center, fine_m) for p in coarse_places)
    assert not any(on_grid(p.center, fine_m) for p in await places(stubs.exact))


async def test_activity_shows_cell_centres_and_whole_cells(served, bus) -> None:
    """GetActivity for a coarse caller: the live and smoothed positions are cell
    centres, and the distances that place the device are whole cells."""
    _, stubs = served
    await publish(stubs, bus, "4716")
    request = history_pb2.GetActivityRequest(device_id="4716")

    async def activity(metadata) -> history_pb2.GetActivityResponse:
        return await stubs.history.GetActivity(request, metadata=metadata)

    # The processors run after the commit: wait until the state stops changing.
    exact, before = None, None
    async with asyncio.timeout(10):
        while exact is None or exact != before:
            await asyncio.sleep(0.3)
            with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND at first
                exact, before = await activity(stubs.exact), exact
    coarse = await activity(stubs.coarse)
    assert await activity(stubs.exact) == exact

    assert exact.odometer_m > CELL_M
    for point in ("position", "smoothed_position"):
        e, c = getattr(exact, point), getattr(coarse, point)
        lat, lon, _ = snap([e.lat], [e.lon], CELL_M)
        assert (c.lat, c.lon) == (lat[0], lon[0]) != (e.lat, e.lon)
    assert coarse.odometer_m == round(exact.odometer_m / CELL_M) * CELL_M
    assert coarse.trip_distance_m % CELL_M == 0
    assert (coarse.motion, coarse.in_trip) == (exact.motion, exact.in_trip)


async def test_history_analytics_work_on_coarse_fixes(served, bus) -> None:
    """A coarse fix claims its cell's accuracy and jumps between cell centres: the
    analysis allows for the grid, so a kilometre-coarse caller still gets the
    bus's trips and the day's distance, in whole cells and without speeds."""
    _, stubs = served
    start_ms = await publish(stubs, bus, "4720", fixes=10_000)
    span = {"device_id": "4720", "start_ms": start_ms, "end_ms": now_ms()}

    async def trips(metadata) -> list[history_pb2.Trip]:
        request = history_pb2.ListTripsRequest(**span)
        return list((await stubs.history.ListTrips(request, metadata=metadata)).trips)

    async def distance(metadata) -> float:
        request = history_pb2.DailySummaryRequest(**span)
        days = (await stubs.history.DailySummary(request, metadata=metadata)).days
        return sum(day.distance_m for day in days)

    exact, coarse = await trips(stubs.exact), await trips(stubs.coarse)
    assert exact and coarse
    assert all(t.distance_m % CELL_M == 0 and t.max_speed_mps == 0 for t in coarse)
    assert sum(t.distance_m for t in coarse) == pytest.approx(
        sum(t.distance_m for t in exact), rel=0.5
    )
    assert await distance(stubs.coarse) == pytest.approx(
        await distance(stubs.exact), rel=0.5
    )
