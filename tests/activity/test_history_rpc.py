"""The History service on a real server (port 0, embedded store)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import xml.etree.ElementTree as ET

import grpc
import numpy as np
import pytest
from tracking.v1 import common_pb2, event_pb2, history_pb2, history_pb2_grpc, track_pb2

from tests.activity.helpers import case_batch, track
from tests.server_fixtures import batch, hello, violation
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import InvalidArgument

DAY_MS = 86_400_000
T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC


def device_fixes(fixes: FixBatch) -> list[track_pb2.DeviceFixes]:
    out = []
    for device in np.unique(fixes.device.astype(str)):
        part = fixes.take(fixes.device.astype(str) == device)
        messages = [
            common_pb2.Fix(
                seq=int(s),
                time_ms=int(t),
                lat=float(la),
                lon=float(lo),
                **({"accuracy_m": float(a)} if a == a else {}),
                **({"speed_mps": float(v)} if v == v else {}),
            )
            for s, t, la, lo, a, v in zip(
                part.seq,
                part.time_ms,
                part.lat,
                part.lon,
                part.accuracy_m,
                part.speed_mps,
                strict=True,
            )
        ]
        out.append(track_pb2.DeviceFixes(device_id=str(device), fixes=messages))
    return out


@pytest.fixture
async def history(start_server):
    server = await start_server(max_fix_age_s=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        from tracking.v1 import track_pb2_grpc

        yield (
            history_pb2_grpc.HistoryStub(channel),
            track_pb2_grpc.TrackSessionStub(channel),
        )


async def publish(track_stub, fixes: FixBatch) -> None:
    response = await track_stub.PublishBatch(
        track_pb2.PublishBatchRequest(devices=device_fixes(fixes))
    )
    assert not response.rejections


async def processed_up_to(
    stub, device: str, time_ms: int, seen: list[int] | None = None
):
    """The device's live activity once it has taken in the run up to ``time_ms``
    (its last minute may wait for more fixes: the motion window): an ack means
    stored, and the processors take a long run in pieces after it. ``seen``
    collects the state's time at each look."""
    request = history_pb2.GetActivityRequest(device_id=device)
    async with asyncio.timeout(60):
        while True:
            try:
                state = await stub.GetActivity(request)
            except grpc.aio.AioRpcError as error:  # no piece taken in yet
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            else:
                if seen is not None:
                    seen.append(state.time_ms)
                if state.time_ms >= time_ms - 60_000:
                    return state
            await asyncio.sleep(0.005)


def commute(device: str = "car", start_ms: int = T0) -> FixBatch:
    """Park 10 min, drive 6 km east at 12 m/s, park 10 min (one fix per 5 s).

    Simplified, the line keeps its first fix, the first fix at the far end, and
    the last fix.
    """
    east = np.concatenate(
        [np.zeros(120), np.arange(1, 101) * 60.0, np.full(120, 6000.0)]
    )
    return track(east, np.zeros(east.size), 5.0, device=device, start_ms=start_ms)


async def test_list_trips_and_stops(history):
    stub, track_stub = history
    await publish(track_stub, commute())
    request = dict(device_id="car", start_ms=T0, end_ms=T0 + DAY_MS)
    trips = (await stub.ListTrips(history_pb2.ListTripsRequest(**request))).trips
    stops = (await stub.ListStops(history_pb2.ListStopsRequest(**request))).stops
    assert len(trips) == 1 and len(stops) == 2
    assert trips[0].distance_m == pytest.approx(6000, rel=0.01)
    assert trips[0].max_speed_mps == pytest.approx(12.0, rel=0.05)
    assert trips[0].start.time_ms == stops[0].end_ms


@pytest.mark.parametrize(
    ("kind", "tolerance_m", "count"),
    [
        pytest.param(history_pb2.TRACK_KIND_RAW, 0, 340, id="raw"),
        pytest.param(history_pb2.TRACK_KIND_SMOOTHED, 0, 340, id="smoothed"),
        pytest.param(history_pb2.TRACK_KIND_RAW, 5.0, 3, id="straight-line-simplified"),
    ],
)
async def test_get_track_kinds_and_simplification(history, kind, tolerance_m, count):
    stub, track_stub = history
    await publish(track_stub, commute())
    request = history_pb2.GetTrackRequest(
        device_id="car",
        start_ms=T0,
        end_ms=T0 + DAY_MS,
        kind=kind,
        simplify_tolerance_m=tolerance_m,
    )
    positions = [p async for r in stub.GetTrack(request) for p in r.positions]
    assert len(positions) == count
    assert [p.time_ms for p in positions] == sorted(p.time_ms for p in positions)


async def test_simplification_keeps_no_parked_jitter(history):
    """A parked receiver flips between two readings a metre apart; at 5 m the line
    keeps the same fixes as without the jitter (the commute's docstring)."""
    stub, track_stub = history
    east = np.concatenate([np.zeros(120), np.arange(1, 101) * 60.0, np.full(120, 6e3)])
    north = np.zeros(east.size)
    north[1:120:2] = 1.0
    await publish(track_stub, track(east, north, 5.0, device="car", start_ms=T0))
    request = history_pb2.GetTrackRequest(
        device_id="car", start_ms=T0, end_ms=T0 + DAY_MS, simplify_tolerance_m=5.0
    )
    positions = [p async for r in stub.GetTrack(request) for p in r.positions]
    assert [p.seq for p in positions] == [1, 220, 340]


async def test_get_track_clips_to_a_circle(history):
    stub, track_stub = history
    await publish(track_stub, commute())
    area = common_pb2.Area(
        circle=common_pb2.Circle(
            center=common_pb2.LatLng(lat=47.0, lon=8.0), radius_m=100
        )
    )
    request = history_pb2.GetTrackRequest(
        device_id="car", start_ms=T0, end_ms=T0 + DAY_MS, clip=area
    )
    positions = [p async for r in stub.GetTrack(request) for p in r.positions]
    assert len(positions) == 120 + 1  # parked fixes and the first 60 m step


@pytest.mark.parametrize(
    "fmt",
    [
        history_pb2.EXPORT_FORMAT_GPX,
        history_pb2.EXPORT_FORMAT_GEOJSON,
        history_pb2.EXPORT_FORMAT_CSV,
    ],
    ids=["gpx", "geojson", "csv"],
)
async def test_export_formats_parse_back(history, fmt):
    stub, track_stub = history
    await publish(track_stub, commute())
    track_request = history_pb2.GetTrackRequest(
        device_id="car", start_ms=T0, end_ms=T0 + DAY_MS
    )
    chunks = [
        c
        async for c in stub.ExportTrack(
            history_pb2.ExportTrackRequest(track=track_request, format=fmt)
        )
    ]
    text = b"".join(c.data for c in chunks).decode()
    if fmt == history_pb2.EXPORT_FORMAT_GPX:
        count = len(ET.fromstring(text).findall(".//{*}trkpt"))
    elif fmt == history_pb2.EXPORT_FORMAT_GEOJSON:
        count = len(json.loads(text)["features"]) - 1
    else:
        count = len(list(csv.DictReader(io.StringIO(text))))
    assert count == 340 and chunks[0].content_type


@pytest.mark.parametrize("fixes", [0, 1, 2])
async def test_geojson_line_needs_two_positions(history, fixes):
    """RFC 7946: a LineString has two positions or more; a shorter track's line
    feature has no geometry, and its fix is a Point feature."""
    stub, track_stub = history
    if fixes:
        await publish(track_stub, commute().take(np.arange(fixes)))
    track = history_pb2.GetTrackRequest(
        device_id="car", start_ms=T0, end_ms=T0 + DAY_MS
    )
    request = history_pb2.ExportTrackRequest(
        track=track, format=history_pb2.EXPORT_FORMAT_GEOJSON
    )
    text = b"".join([c.data async for c in stub.ExportTrack(request)]).decode()
    line, *points = json.loads(text)["features"]
    assert len(points) == fixes == line["properties"]["fix_count"]
    if fixes < 2:
        assert line["geometry"] is None
    else:
        assert line["geometry"]["type"] == "LineString"
        assert len(line["geometry"]["coordinates"]) == 2


@pytest.mark.parametrize(
    "device",
    [
        pytest.param('=HYPERLINK("http://x","y")', id="equals"),
        pytest.param("+1+2", id="plus"),
        pytest.param("-2+3", id="minus"),
        pytest.param("@SUM(A1)", id="at"),
        pytest.param('="quoted"', id="equals-with-quotes"),
    ],
)
async def test_csv_export_defuses_a_device_id_a_spreadsheet_would_run(history, device):
    stub, track_stub = history
    await publish(track_stub, commute(device))
    track_request = history_pb2.GetTrackRequest(
        device_id=device, start_ms=T0, end_ms=T0 + DAY_MS
    )
    request = history_pb2.ExportTrackRequest(
        track=track_request, format=history_pb2.EXPORT_FORMAT_CSV
    )
    text = b"".join([c.data async for c in stub.ExportTrack(request)]).decode()
    cells = {row["device_id"] for row in csv.DictReader(io.StringIO(text))}
    assert cells == {"'" + device}


async def test_daily_summary_splits_a_trip_at_local_midnight(history):
    stub, track_stub = history
    # 2023-11-14 23:00 Europe/Zurich is 22:00 UTC: park, then drive over midnight.
    start = 1_700_002_800_000 - 600_000 - 15 * 60_000
    east = np.concatenate(
        [np.zeros(120), np.arange(1, 361) * 50.0, np.full(120, 18000.0)]
    )
    fixes = track(east, np.zeros(east.size), 5.0, device="car", start_ms=start)
    await publish(track_stub, fixes)
    response = await stub.DailySummary(
        history_pb2.DailySummaryRequest(
            device_id="car",
            start_ms=start,
            end_ms=start + DAY_MS // 2,
            time_zone="Europe/Zurich",
        )
    )
    days = {d.date: d for d in response.days}
    assert set(days) == {"2023-11-14", "2023-11-15"}
    total = days["2023-11-14"].distance_m + days["2023-11-15"].distance_m
    assert total == pytest.approx(18000, rel=0.01)
    assert min(days["2023-11-14"].distance_m, days["2023-11-15"].distance_m) > 1000
    assert days["2023-11-14"].trip_count == days["2023-11-15"].trip_count == 1


async def test_frequent_places_home_work_and_heatmap(history):
    stub, track_stub = history
    parts = []
    for day in range(3):  # Mon 2023-11-13 ... : night at home, day at work
        base = 1_699_830_000_000 + day * DAY_MS  # 2023-11-12 23:00 UTC
        night = track(np.zeros(96), np.zeros(96), 300.0, device="p", start_ms=base)
        ride_start = int(night.time_ms[-1]) + 300_000
        ride = track(
            np.arange(1, 61) * 50.0, np.zeros(60), 5.0, device="p", start_ms=ride_start
        )
        work = track(
            np.full(96, 3000.0),
            np.zeros(96),
            300.0,
            device="p",
            start_ms=int(ride.time_ms[-1]) + 300_000,
        )
        back = track(
            3000.0 - np.arange(1, 61) * 50.0,
            np.zeros(60),
            5.0,
            device="p",
            start_ms=int(work.time_ms[-1]) + 300_000,
        )
        parts += [night, ride, work, back]
    fixes = FixBatch.concat(parts)
    fixes = FixBatch.from_columns(
        "t",
        fixes.device,
        np.arange(1, len(fixes) + 1),
        fixes.time_ms,
        fixes.lat,
        fixes.lon,
        accuracy_m=fixes.accuracy_m,
    )
    await publish(track_stub, fixes)
    span = dict(
        device_id="p", start_ms=1_699_830_000_000, end_ms=1_699_830_000_000 + 4 * DAY_MS
    )
    places = (
        await stub.FrequentPlaces(history_pb2.FrequentPlacesRequest(**span))
    ).places
    assert len(places) == 2 and places[0].visit_count >= 3
    roles = await stub.HomeWork(history_pb2.HomeWorkRequest(**span, time_zone="UTC"))
    assert roles.home.place.center.lon == pytest.approx(8.0, abs=1e-4)
    assert roles.work.place.center.lon > 8.03
    heat = await stub.Heatmap(history_pb2.HeatmapRequest(**span, resolution=9))
    assert sum(c.fix_count for c in heat.cells) == len(fixes)
    assert heat.cells[0].fix_count >= 288


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        pytest.param(
            history_pb2.ListTripsRequest(device_id="", end_ms=1),
            "device_id",
            id="no-device",
        ),
        pytest.param(
            history_pb2.ListTripsRequest(device_id="d", start_ms=5, end_ms=5),
            "end_ms",
            id="empty-range",
        ),
        pytest.param(
            history_pb2.ListTripsRequest(device_id="d", end_ms=400 * DAY_MS),
            "end_ms",
            id="over-366-days",
        ),
    ],
)
async def test_bad_ranges_name_the_field(history, request_, field):
    stub, _ = history
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.ListTrips(request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()


@pytest.mark.parametrize(
    ("call", "request_", "field"),
    [
        pytest.param(
            "DailySummary",
            history_pb2.DailySummaryRequest(
                device_id="d", end_ms=1, time_zone="Mars/Base"
            ),
            "time_zone",
            id="bad-zone",
        ),
        pytest.param(
            "DailySummary",
            history_pb2.DailySummaryRequest(
                device_id="d", end_ms=1, time_zone="localtime"
            ),
            "time_zone",
            id="the-servers-own-zone",
        ),
        pytest.param(
            "Heatmap",
            history_pb2.HeatmapRequest(device_id="d", end_ms=1, resolution=16),
            "resolution",
            id="bad-resolution",
        ),
        pytest.param(
            "FrequentPlaces",
            history_pb2.FrequentPlacesRequest(
                device_id="d", end_ms=1, place_radius_m=-1
            ),
            "place_radius_m",
            id="bad-radius",
        ),
    ],
)
async def test_bad_options_name_the_field(history, call, request_, field):
    stub, _ = history
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await getattr(stub, call)(request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()


FAR_FUTURE_RANGES = [
    pytest.param(253_402_300_800_000, id="year-10000"),
    pytest.param(253_402_300_800_000 + 300 * DAY_MS, id="past-year-10000"),
    pytest.param(2**63 - 1, id="int64-max"),
    pytest.param(2**63 - 1 - 5 * DAY_MS, id="near-int64-max"),
    pytest.param(253_370_764_800_000 + DAY_MS, id="just-past-9999-01-01"),
]
HISTORY_CALLS = [
    ("DailySummary", history_pb2.DailySummaryRequest),
    ("HomeWork", history_pb2.HomeWorkRequest),
    ("ListTrips", history_pb2.ListTripsRequest),
    ("GetTrack", history_pb2.GetTrackRequest),
]


@pytest.mark.parametrize("end_ms", FAR_FUTURE_RANGES)
@pytest.mark.parametrize(
    ("call", "message"), [pytest.param(*c, id=c[0]) for c in HISTORY_CALLS]
)
async def test_ranges_past_year_9999_name_end_ms(history, call, message, end_ms):
    stub, _ = history
    request = message(device_id="d", start_ms=end_ms - DAY_MS, end_ms=end_ms)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        answer = getattr(stub, call)(request)
        [r async for r in answer] if call == "GetTrack" else await answer
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(error.value) == (
        "end_ms",
        "must be at most 253370764800000 (9999-01-01)",
    )


async def test_a_day_summary_up_to_the_latest_time_is_answered(history):
    stub, _ = history
    end_ms = 253_370_764_800_000
    request = history_pb2.DailySummaryRequest(
        device_id="d",
        start_ms=end_ms - DAY_MS,
        end_ms=end_ms,
        time_zone="Pacific/Kiritimati",
    )
    answer = await stub.DailySummary(request)
    assert [d.date for d in answer.days] == ["9998-12-31", "9999-01-01"]


@pytest.mark.parametrize(
    ("track", "field"),
    [
        pytest.param(None, "track.device_id", id="unset-track"),
        pytest.param(
            history_pb2.GetTrackRequest(device_id="d", start_ms=5, end_ms=1),
            "track.end_ms",
            id="reversed-range",
        ),
    ],
)
async def test_export_names_the_track_field(history, track, field):
    stub, _ = history
    request = history_pb2.ExportTrackRequest(
        format=history_pb2.EXPORT_FORMAT_GPX, track=track
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        [r async for r in stub.ExportTrack(request)]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(error.value)[0] == field


async def test_get_track_rejects_bad_tolerance_and_clip(history):
    stub, _ = history
    for request_, field in [
        (
            history_pb2.GetTrackRequest(
                device_id="d", end_ms=1, simplify_tolerance_m=-1
            ),
            "simplify_tolerance_m",
        ),
        (
            history_pb2.GetTrackRequest(
                device_id="d",
                end_ms=1,
                clip=common_pb2.Area(
                    box=common_pb2.BoundingBox(south=10, north=5, west=0, east=1)
                ),
            ),
            "clip.box",
        ),
        (
            history_pb2.GetTrackRequest(
                device_id="d",
                end_ms=1,
                clip=common_pb2.Area(circle=common_pb2.Circle(radius_m=100)),
            ),
            "clip.circle.center",  # unset: not a circle at 0, 0
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in stub.GetTrack(request_):
                pass
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.value.details()


@pytest.mark.parametrize(
    "box",
    [
        pytest.param(common_pb2.BoundingBox(), id="unset"),
        pytest.param(
            common_pb2.BoundingBox(south=5, north=5, west=0, east=1), id="no-height"
        ),
        pytest.param(
            common_pb2.BoundingBox(south=5, north=6, west=170, east=170), id="no-width"
        ),
    ],
)
async def test_get_track_refuses_an_empty_clip_box(history, box):
    """A flat box matches nothing: refused, not answered with an empty track."""
    stub, _ = history
    request = history_pb2.GetTrackRequest(
        device_id="d", end_ms=1, clip=common_pb2.Area(box=box)
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in stub.GetTrack(request):
            pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    field, reason = violation(error.value)
    assert field == "clip.box" and "the box is empty" in reason


async def test_a_long_backlog_is_processed_while_other_calls_are_served(history):
    """A device uploading hours of buffered fixes in one batch: the processors
    take them in pieces, so calls are answered in between (before, one 20,000-fix
    backlog held the event loop for seconds: a call saw nothing or everything),
    and the piecewise result is the whole run's."""
    stub, track_stub = history
    fixes = track(np.arange(20_000) * 10.0, np.zeros(20_000), 1.0, device="van")
    await publish(track_stub, fixes)
    last, seen = int(fixes.time_ms[-1]), []
    state = await processed_up_to(stub, "van", last, seen)
    assert any(int(fixes.time_ms[0]) <= t < last - 60_000 for t in seen)
    assert state.odometer_m == pytest.approx(199_990, rel=0.01)


async def test_get_activity_live_state_and_unknown_device(history):
    stub, track_stub = history
    fixes = commute()
    await publish(track_stub, fixes)
    state = await processed_up_to(stub, "car", int(fixes.time_ms[-1]))
    assert state.online and state.in_stop and state.motion == event_pb2.MOTION_STOPPED
    assert state.odometer_m == pytest.approx(6000, rel=0.02)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetActivity(history_pb2.GetActivityRequest(device_id="nobody"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_device_stream_receives_trip_events(history, field_cases):
    _, track_stub = history
    case = field_cases["C21"]
    fixes = case_batch(case)
    call = track_stub.Track()
    await call.write(hello("dev-A", want_events=True))
    await call.read()
    await call.write(batch(device_fixes(fixes)[0].fixes))
    seen = []
    while "TRIP_ENDED" not in seen:
        response = await call.read()
        if response.WhichOneof("message") == "event":
            seen.append(
                event_pb2.EventType.Name(response.event.type)[len("EVENT_TYPE_") :]
            )
            if seen[-1] == "TRIP_ENDED":
                ended = response.event
    await call.done_writing()
    assert seen[:4] == ["ONLINE", "STOP_STARTED", "STOP_ENDED", "TRIP_STARTED"]
    assert ended.activity.distance_m == pytest.approx(14_399.9, rel=0.01)


async def test_offline_event_from_the_tick_with_tenant_rules(start_server, tmp_path):
    rules = tmp_path / "activity.toml"
    rules.write_text("[tenants.default]\noffline_after_s = 1\n")
    server = await start_server(max_fix_age_s=0, activity_config=str(rules))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        from tracking.v1 import track_pb2_grpc

        call = track_pb2_grpc.TrackSessionStub(channel).Track()
        await call.write(hello("quiet", want_events=True))
        await call.read()
        await call.write(batch([common_pb2.Fix(seq=1, time_ms=T0, lat=47.0, lon=8.0)]))
        seen = []
        while "OFFLINE" not in seen:
            response = await asyncio.wait_for(call.read(), timeout=10)
            if response.WhichOneof("message") == "event":
                seen.append(event_pb2.EventType.Name(response.event.type)[11:])
        await call.done_writing()
    assert seen == ["ONLINE", "OFFLINE"]


async def test_bad_activity_rules_stop_the_server_naming_the_key(
    start_server, tmp_path
):
    rules = tmp_path / "activity.toml"
    rules.write_text("[tenants.default]\nmin_stop_s = -5\n")
    data = tmp_path / "bad-rules-data"
    with pytest.raises(InvalidArgument, match="min_stop_s"):
        await start_server(activity_config=str(rules), data_dir=str(data))
    assert not data.exists()  # refused before an empty store was created
