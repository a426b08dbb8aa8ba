"""TrackSession RPCs against a real server on port 0 with the embedded store."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc

from tests.server_fixtures import batch, fix, hello, now_ms, track_session
from tracking_grpc.errors import StorageUnavailable

R = track_pb2.RejectReason


async def test_stream_stores_fixes_and_acks_highest_seq(stub, server) -> None:
    started, acks = await track_session(
        stub, "bus-1", [[fix(1, 53.4, -2.9), fix(2, 53.41, -2.91, accuracy_m=4)]]
    )
    assert started.last_stored_seq == 0
    assert (acks[0].acked_seq, acks[0].stored, acks[0].duplicates) == (2, 2, 0)
    assert await server.app.history.count("default", "bus-1") == 2


async def test_resend_after_reconnect_is_idempotent(stub, server) -> None:
    t = now_ms()
    fixes = [fix(1, 10.0, 10.0, t - 2000), fix(2, 10.001, 10.0, t - 1000)]
    await track_session(stub, "d", [fixes])
    started, acks = await track_session(stub, "d", [fixes])
    assert started.last_stored_seq == 2
    assert (acks[0].stored, acks[0].duplicates, acks[0].acked_seq) == (0, 2, 2)
    assert await server.app.history.count("default", "d") == 2


@pytest.mark.parametrize(
    ("lat", "lon", "reason"),
    [
        pytest.param(91.0, 0.5, R.REJECT_REASON_LATITUDE_OUT_OF_RANGE, id="lat>90"),
        pytest.param(
            10.0, -270.6, R.REJECT_REASON_LONGITUDE_OUT_OF_RANGE, id="lon<-180"
        ),
        pytest.param(float("nan"), 1.0, R.REJECT_REASON_NOT_FINITE, id="nan"),
        pytest.param(1.0, float("inf"), R.REJECT_REASON_NOT_FINITE, id="inf"),
        pytest.param(0.0, 0.0, R.REJECT_REASON_NULL_ISLAND, id="null-island"),
    ],
)
async def test_bad_fix_is_rejected_and_stream_goes_on(stub, server, lat, lon, reason):
    _, acks = await track_session(stub, "d", [[fix(1, lat, lon)], [fix(2, 45.0, 7.0)]])
    assert [(r.seq, r.reason) for r in acks[0].rejections] == [(1, reason)]
    named = {  # the detail names the value sent
        R.REJECT_REASON_LATITUDE_OUT_OF_RANGE: f"latitude {lat:g} ",
        R.REJECT_REASON_LONGITUDE_OUT_OF_RANGE: f"longitude {lon:g} ",
        R.REJECT_REASON_NOT_FINITE: f"latitude {lat:g} and longitude {lon:g} ",
    }
    assert acks[0].rejections[0].detail.startswith(named.get(reason, ""))
    assert acks[0].stored == 0
    assert (acks[1].stored, acks[1].acked_seq) == (1, 2)


ATTRIBUTE_CASES = [
    ("speed", {"speed_mps": -1.0}, "speed_mps -1 must be in [0, 10000]"),
    ("heading", {"heading_deg": 361.0}, "heading_deg 361 must be in [0, 360]"),
    ("battery", {"battery_pct": 101.0}, "battery_pct 101 must be in [0, 100]"),
    ("altitude", {"altitude_m": 1e7}, "altitude_m 1e+07 must be in [-12000, 100000]"),
    ("provider", {"provider": 99}, "provider 99 is not a defined Provider value"),
]


@pytest.mark.parametrize(
    ("extra", "detail"),
    [pytest.param(extra, detail, id=name) for name, extra, detail in ATTRIBUTE_CASES],
)
async def test_a_bad_attribute_is_named_with_its_value(stub, extra, detail) -> None:
    """One reason code covers every attribute; the detail says which one failed."""
    fixes = [fix(1, 45.0, 7.0, **extra), fix(2, 45.0, 7.0)]
    _, acks = await track_session(stub, "d", [fixes])
    rejection = acks[0].rejections[0]
    assert (rejection.seq, rejection.reason) == (1, R.REJECT_REASON_INVALID_ATTRIBUTE)
    assert rejection.detail == detail
    assert acks[0].stored == 1


ACCURACY_DETAIL = "accuracy_m 1e+30 must be in [0, 1000000] (1000 km)"


async def test_an_implausible_accuracy_is_rejected_on_the_stream(stub, server) -> None:
    """Geofence.Check refuses an accuracy over 1,000 km; ingest rejects it too."""
    fixes = [fix(1, 45.0, 7.0, accuracy_m=1e30), fix(2, 45.0, 7.0, accuracy_m=1e6)]
    _, acks = await track_session(stub, "d", [fixes])
    [rejection] = acks[0].rejections
    assert (rejection.seq, rejection.reason) == (1, R.REJECT_REASON_INVALID_ACCURACY)
    assert rejection.detail == ACCURACY_DETAIL
    assert await server.app.history.count("default", "d") == 1


async def test_an_implausible_accuracy_is_rejected_in_a_batch(stub, server) -> None:
    t = now_ms()
    columns = track_pb2.ColumnarFixes(
        device_ids=["g"],
        device_index=[0, 0],
        seq=[1, 2],
        time_ms=[t - 2000, t - 1000],
        lat=[1.0, 1.001],
        lon=[1.0, 1.0],
        accuracy_m=[1e30, 5.0],
    )
    reply = await stub.PublishBatch(track_pb2.PublishBatchRequest(columns=columns))
    assert [(r.seq, r.reason, r.detail) for r in reply.rejections] == [
        (1, R.REJECT_REASON_INVALID_ACCURACY, ACCURACY_DETAIL)
    ]
    assert (reply.stored, await server.app.history.count("default", "g")) == (1, 1)


UNDEFINED_PROVIDERS = [
    pytest.param(7, id="just-above-enum"),
    pytest.param(128, id="int8-max+1"),
    pytest.param(200, id="wraps-negative-in-int8"),
    pytest.param(256, id="wraps-to-unspecified"),
    pytest.param(257, id="wraps-to-gnss"),
    pytest.param(262, id="wraps-to-manual"),
    pytest.param(1000, id="thousand"),
    pytest.param(2**31 - 1, id="int32-max"),
    pytest.param(-1, id="minus-one"),
    pytest.param(-5, id="negative"),
    pytest.param(-255, id="wraps-to-gnss-negative"),
    pytest.param(-(2**31), id="int32-min"),
]


def provider_detail(value: int) -> str:
    return f"provider {value} is not a defined Provider value"


@pytest.mark.parametrize("value", UNDEFINED_PROVIDERS)
async def test_row_fix_with_undefined_provider_is_rejected_by_value(
    stub, server, value
) -> None:
    fixes = [fix(1, 45.0, 7.0, provider=value), fix(2, 45.0, 7.0)]
    _, acks = await track_session(stub, "d", [fixes])
    [rejection] = acks[0].rejections
    assert (rejection.seq, rejection.reason) == (1, R.REJECT_REASON_INVALID_ATTRIBUTE)
    assert rejection.detail == provider_detail(value)
    assert await server.app.history.count("default", "d") == 1


@pytest.mark.parametrize("value", UNDEFINED_PROVIDERS)
async def test_columnar_fix_with_undefined_provider_is_rejected_by_value(
    stub, server, value
) -> None:
    t = now_ms()
    columns = track_pb2.ColumnarFixes(
        device_ids=["g"],
        device_index=[0, 0],
        seq=[1, 2],
        time_ms=[t - 2000, t - 1000],
        lat=[1.0, 1.001],
        lon=[1.0, 1.0],
        provider=[value, common_pb2.PROVIDER_GNSS],
    )
    reply = await stub.PublishBatch(track_pb2.PublishBatchRequest(columns=columns))
    assert [(r.seq, r.detail) for r in reply.rejections] == [
        (1, provider_detail(value))
    ]
    assert (reply.stored, await server.app.history.count("default", "g")) == (1, 1)


async def test_first_message_must_be_hello(stub) -> None:
    call = stub.Track()
    await call.write(batch([fix(1, 1.0, 1.0)]))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello" in raised.value.details()


@pytest.mark.parametrize("device_id", ["", "   ", "x" * 129, "bad\nid"])
async def test_hello_device_id_is_checked(stub, device_id) -> None:
    call = stub.Track()
    await call.write(hello(device_id))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("hello.device_id")


@pytest.mark.parametrize("again", [False, True], ids=["first-hello", "repeated"])
async def test_hello_resume_from_seq_beyond_any_fix_seq_is_refused(stub, again) -> None:
    """Fix seqs end at 2^63 - 1 (signed 64-bit in the stores): a hello resuming
    past them ends the stream, as another bad hello does."""
    call = stub.Track()
    if again:
        await call.write(hello("resumer", resume_from_seq=2**63 - 1))
        assert (await call.read()).WhichOneof("message") == "started"
    await call.write(hello("resumer", resume_from_seq=2**64 - 1))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(call.read(), 10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert details.startswith("hello.resume_from_seq")
    assert "exceeds the largest sequence number" in details


async def test_late_fix_never_moves_live_position_back(stub) -> None:
    t = now_ms()
    await track_session(
        stub, "d", [[fix(1, 1.0, 1.0, t)], [fix(2, 2.0, 2.0, t - 60_000)]]
    )
    reply = await stub.GetLastPositions(
        track_pb2.GetLastPositionsRequest(device_ids=["d"])
    )
    assert (reply.positions[0].seq, reply.positions[0].lat) == (1, 1.0)


async def test_last_positions_keep_request_order_and_list_missing(stub) -> None:
    await track_session(stub, "a", [[fix(1, 1.0, 1.0)]])
    await track_session(stub, "b", [[fix(1, 2.0, 2.0)]])
    reply = await stub.GetLastPositions(
        track_pb2.GetLastPositionsRequest(device_ids=["b", "zz", "a"])
    )
    assert [p.device_id for p in reply.positions] == ["b", "a"]
    assert list(reply.missing_device_ids) == ["zz"]


async def test_nearby_is_ordered_and_crosses_the_antimeridian(stub) -> None:
    for name, lon in (("east", 179.99), ("west", -179.995), ("far", 170.0)):
        await track_session(stub, name, [[fix(1, 0.0, lon)]])
    reply = await stub.Nearby(
        track_pb2.NearbyRequest(
            center=common_pb2.LatLng(lat=0.0, lon=-179.999), radius_m=5_000
        )
    )
    assert [d.position.device_id for d in reply.devices] == ["west", "east"]
    assert reply.devices[0].distance_m == pytest.approx(0.004 * 111_195.08, rel=1e-4)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        pytest.param(track_pb2.NearbyRequest(radius_m=10), "center", id="no-center"),
        pytest.param(
            track_pb2.NearbyRequest(center=common_pb2.LatLng(lat=95), radius_m=1),
            "center.lat",
            id="bad-lat",
        ),
        pytest.param(
            track_pb2.NearbyRequest(center=common_pb2.LatLng(lat=1), radius_m=-1),
            "radius_m",
            id="negative-radius",
        ),
    ],
)
async def test_nearby_rejects_bad_requests(stub, request_, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Nearby(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(field)


async def test_columnar_batch_stores_many_devices(stub, server) -> None:
    t = now_ms()
    columns = track_pb2.ColumnarFixes(
        device_ids=["g1", "g2"],
        device_index=[0, 1, 0, 1],
        seq=[1, 1, 2, 2],
        time_ms=[t - 3000, t - 3000, t - 1000, t - 1000],
        lat=[1.0, 2.0, 1.001, 95.0],
        lon=[1.0, 2.0, 1.0, 2.0],
    )
    reply = await stub.PublishBatch(track_pb2.PublishBatchRequest(columns=columns))
    assert (reply.stored, reply.duplicates) == (3, 0)
    assert [(r.device_id, r.seq) for r in reply.rejections] == [("g2", 2)]
    assert await server.app.history.count("default") == 3


async def test_mostly_rejected_big_batch_answers_within_4_mb(stub, server) -> None:
    n = 100_000
    t = now_ms() - 600_000
    seq = np.arange(1, n + 1)
    columns = track_pb2.ColumnarFixes(
        device_ids=[f"gateway-7/vehicle-{i:036d}" for i in range(2)],
        device_index=(seq % 2).tolist(),
        seq=seq.tolist(),
        time_ms=(t + seq).tolist(),
        lat=np.full(n, 10.0).tolist(),
        lon=np.full(n, 10.0).tolist(),
        speed_mps=np.where(seq % 2 == 0, -1.5, 10.0).tolist(),  # even seqs: bad
    )
    reply = await stub.PublishBatch(track_pb2.PublishBatchRequest(columns=columns))
    assert (reply.stored, reply.duplicates, reply.rejected) == (n // 2, 0, n // 2)
    assert [r.seq for r in reply.rejections] == list(range(2, 2_001, 2))
    assert reply.ByteSize() < 4 * 1024 * 1024
    assert await server.app.history.count("default") == n // 2


async def test_ack_lists_the_first_1000_rejections_and_counts_all(stub) -> None:
    fixes = [fix(seq, 91.0 if seq <= 2_500 else 10.0, 10.0) for seq in range(1, 3001)]
    _, acks = await track_session(stub, "d", [fixes])
    assert (acks[0].stored, acks[0].rejected, acks[0].acked_seq) == (500, 2_500, 3000)
    assert [r.seq for r in acks[0].rejections] == list(range(1, 1_001))


async def test_columnar_batch_with_ragged_columns_names_the_field(stub) -> None:
    columns = track_pb2.ColumnarFixes(
        device_ids=["g"],
        device_index=[0, 0],
        seq=[1, 2],
        time_ms=[1, 2],
        lat=[1.0],
        lon=[1.0, 2.0],
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.PublishBatch(track_pb2.PublishBatchRequest(columns=columns))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "columns.lat: has 1 values, seq has 2"


async def test_watch_sends_snapshot_then_updates_in_fix_time_order(stub) -> None:
    await track_session(stub, "a", [[fix(1, 1.0, 1.0)]])
    watch = stub.Watch(track_pb2.WatchRequest(device_ids=["a"]))
    first = await watch.read()
    assert first.snapshot and [p.device_id for p in first.positions] == ["a"]
    assert (await watch.read()).snapshot_done
    t = now_ms()
    await track_session(stub, "a", [[fix(2, 1.1, 1.0, t)], [fix(3, 1.2, 1.0, t + 1)]])
    seen = []
    while len(seen) < 1 or seen[-1] != 3:
        update = await asyncio.wait_for(watch.read(), 5)
        seen.extend(p.seq for p in update.positions)
    assert seen == sorted(seen) and seen[-1] == 3
    watch.cancel()


async def test_watch_by_box_across_antimeridian(stub) -> None:
    watch = stub.Watch(
        track_pb2.WatchRequest(
            area=common_pb2.Area(
                box=common_pb2.BoundingBox(south=-1, west=179, north=1, east=-179)
            ),
            skip_snapshot=True,
        )
    )
    await track_session(stub, "out", [[fix(1, 0.0, 170.0)]])
    await track_session(stub, "in", [[fix(1, 0.0, -179.5)]])
    update = await asyncio.wait_for(watch.read(), 30)  # a guard against a hang
    assert [p.device_id for p in update.positions] == ["in"]
    watch.cancel()


async def test_watch_refuses_an_empty_box(stub) -> None:
    """An unset box reads as 0, 0, 0, 0 in proto3: refused, not watched there."""
    watch = stub.Watch(track_pb2.WatchRequest(area=common_pb2.Area(box={})))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await watch.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "area.box: the box is empty" in raised.value.details()


async def test_watch_refuses_a_box_flat_on_the_antimeridian(stub) -> None:
    """West 180 and east -180 cross the antimeridian with no width (one meridian):
    refused like west == east, not watched as an area that matches nothing."""
    box = common_pb2.BoundingBox(south=-20, west=180, north=-10, east=-180)
    watch = stub.Watch(track_pb2.WatchRequest(area=common_pb2.Area(box=box)))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await watch.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "area.box: the box is empty" in raised.value.details()


async def test_watch_by_circle_needs_its_centre(stub) -> None:
    """An unset centre reads as 0, 0 in proto3: refused, not watched there."""
    area = common_pb2.Area(circle=common_pb2.Circle(radius_m=500))
    watch = stub.Watch(track_pb2.WatchRequest(area=area))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await watch.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "area.circle.center" in raised.value.details()


async def test_slow_watcher_gets_newest_position_coalesced(server, stub) -> None:
    from tracking_grpc.fanout import Watcher, WatchFilter

    watcher = Watcher("default", WatchFilter(devices=frozenset({"c"})))
    await server.app.hub.add(watcher)
    t = now_ms()
    await track_session(
        stub, "c", [[fix(i, 1.0 + i / 1000, 1.0, t + i)] for i in range(1, 6)]
    )
    updates = await asyncio.wait_for(watcher.next_updates(), 5)
    assert updates.seq.tolist() == [5]
    assert watcher.coalesced >= 1


async def test_empty_batch_gets_its_own_ack(stub) -> None:
    _, acks = await track_session(stub, "d", [[], [fix(1, 1.0, 1.0)]])
    assert [(a.acked_seq, a.stored) for a in acks] == [(0, 0), (1, 1)]


async def test_last_stored_seq_counts_only_stored_sequence_numbers(stub) -> None:
    t = now_ms()
    await track_session(stub, "d", [[fix(1, 1.0, 1.0, t - 2000)]])
    # seq 100 repeats seq 1's fix time: a duplicate, so 100 is not stored
    started, acks = await track_session(stub, "d", [[fix(100, 1.0, 1.0, t - 2000)]])
    again, _ = await track_session(stub, "d", [])
    assert (acks[0].duplicates, acks[0].last_stored_seq) == (1, 1)
    assert started.last_stored_seq == again.last_stored_seq == 1


async def test_pipelined_batches_are_acked_in_order(stub, server) -> None:
    t = now_ms()
    batches = [
        [fix(seq, 45.0 + seq / 1e4, 7.0, t - 20_000 + seq)] for seq in range(1, 21)
    ]
    _, acks = await track_session(stub, "pipelined", batches)
    assert [a.acked_seq for a in acks] == list(range(1, 21))
    assert [a.last_stored_seq for a in acks] == list(range(1, 21))
    assert await server.app.history.count("default", "pipelined") == 20


async def test_stream_ends_unavailable_when_its_fixes_cannot_be_stored(
    stub, server, monkeypatch
) -> None:
    """The store is away and the server shuts down: the waiting stream is told
    UNAVAILABLE instead of hanging or getting an ack for fixes not stored."""

    async def store_away(batch):
        raise StorageUnavailable("store away (test)")

    monkeypatch.setattr(server.app.history, "store", store_away)
    call = stub.Track()
    await call.write(hello("stranded"))
    assert (await call.read()).HasField("started")
    await call.write(batch([fix(1, 45.0, 7.0)]))
    await asyncio.sleep(0.2)  # the commit is retrying with back-off
    closing = asyncio.create_task(server.app.pipeline.close())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "store away" in raised.value.details()
    await closing


async def test_a_commit_whose_answer_was_lost_still_moves_the_live_position(
    stub, server, monkeypatch
) -> None:
    """The store wrote the fixes but its answer never came (the connection broke
    after COMMIT): the retry finds them stored as this commit received them, so
    the ack counts them as stored, and the live position moves to them."""
    store = server.app.history.store
    answers_lost = 1

    async def answer_lost_once(fixes):
        nonlocal answers_lost
        new = await store(fixes)
        if answers_lost:
            answers_lost -= 1
            raise StorageUnavailable("connection lost after COMMIT (test)")
        return new

    monkeypatch.setattr(server.app.history, "store", answer_lost_once)
    t = now_ms()
    _, acks = await track_session(stub, "lost-answer", [[fix(1, 45.5, 7.5, t)]])
    ack = acks[0]
    assert (ack.acked_seq, ack.stored, ack.duplicates, ack.last_stored_seq) == (
        1, 1, 0, 1,
    )  # fmt: skip
    live = await server.app.live.get("default", ["lost-answer"])
    assert (live.seq.tolist(), live.lat.tolist()) == ([1], [45.5])


@pytest.mark.parametrize("form", ["devices", "columns"])
async def test_an_oversized_gateway_batch_names_the_part_it_came_in(
    start_server, form
) -> None:
    server = await start_server(max_batch_fixes=2)
    t = now_ms()
    if form == "devices":
        device = track_pb2.DeviceFixes(
            device_id="g", fixes=[fix(i, 1.0, 1.0, t + i) for i in (1, 2, 3)]
        )
        request = track_pb2.PublishBatchRequest(devices=[device])
    else:
        columns = track_pb2.ColumnarFixes(
            device_ids=["g"],
            device_index=[0, 0, 0],
            seq=[1, 2, 3],
            time_ms=[t + 1, t + 2, t + 3],
            lat=[1.0] * 3,
            lon=[1.0] * 3,
        )
        request = track_pb2.PublishBatchRequest(columns=columns)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await track_pb2_grpc.TrackSessionStub(channel).PublishBatch(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == f"{form}: 3 fixes exceed 2"


async def test_protocol_error_comes_after_the_acks_of_earlier_batches(
    stub, server
) -> None:
    call = stub.Track()
    await call.write(hello("sh1"))
    assert (await call.read()).WhichOneof("message") == "started"
    for seq in (1, 2, 3):
        await call.write(batch([fix(seq, 45.0, 7.0 + seq / 1000)]))
    await call.write(hello("sh2"))  # before any ack is read: the stream ends
    acked = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        while True:
            acked.append((await asyncio.wait_for(call.read(), 10)).ack.acked_seq)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert acked == [1, 2, 3]
    assert await server.app.history.count("default", "sh1") == 3
