"""The device id rule, the same wherever ids come in, against a real server on port 0.

An id with a space at either end (or a control character) is refused with
INVALID_ARGUMENT naming the field, instead of becoming a device apart from the
trimmed id.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tracking.v1 import (
    geofence_pb2,
    geofence_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
    track_pb2,
    track_pb2_grpc,
)

from tests.server_fixtures import fix, hello, now_ms, violation
from tracking_grpc.convert import check_device_ids, device_id_fault
from tracking_grpc.errors import InvalidArgument

EDGE_SPACE = "must not start or end with a space"
BAD_IDS = [
    pytest.param(" van-7", EDGE_SPACE, id="leading-space"),
    pytest.param("van-7 ", EDGE_SPACE, id="trailing-space"),
    pytest.param("  van-7  ", EDGE_SPACE, id="spaces-both-ends"),
    pytest.param(
        "van-7\t",
        "has a character that is not printable",
        id="trailing-tab",
    ),
    pytest.param(
        "\u00a0van-7",
        "has a character that is not printable",
        id="leading-nbsp",
    ),
]


async def _hello(channel, bad: str) -> None:
    call = track_pb2_grpc.TrackSessionStub(channel).Track()
    await call.write(hello(bad))
    await call.read()


async def _rows(channel, bad: str) -> None:
    device = track_pb2.DeviceFixes(device_id=bad, fixes=[fix(1, 45.0, 7.0)])
    request = track_pb2.PublishBatchRequest(devices=[device])
    await track_pb2_grpc.TrackSessionStub(channel).PublishBatch(request)


async def _columns(channel, bad: str) -> None:
    t = now_ms()
    columns = track_pb2.ColumnarFixes(
        device_ids=["van-7", bad],
        device_index=[0, 1],
        seq=[1, 1],
        time_ms=[t, t],
        lat=[45.0, 45.1],
        lon=[7.0, 7.1],
    )
    request = track_pb2.PublishBatchRequest(columns=columns)
    await track_pb2_grpc.TrackSessionStub(channel).PublishBatch(request)


async def _last_positions(channel, bad: str) -> None:
    request = track_pb2.GetLastPositionsRequest(device_ids=["van-7", bad])
    await track_pb2_grpc.TrackSessionStub(channel).GetLastPositions(request)


async def _watch(channel, bad: str) -> None:
    request = track_pb2.WatchRequest(device_ids=[bad])
    await track_pb2_grpc.TrackSessionStub(channel).Watch(request).read()


async def _watch_events(channel, bad: str) -> None:
    request = geofence_pb2.WatchEventsRequest(device_ids=["van-7", bad])
    call = geofence_pb2_grpc.GeofenceStub(channel).WatchEvents(request)
    await asyncio.wait_for(call.read(), 10)  # an accepted watch would wait on


async def _list_events(channel, bad: str) -> None:
    request = geofence_pb2.ListEventsRequest(device_id=bad)
    await geofence_pb2_grpc.GeofenceStub(channel).ListEvents(request)


async def _track(channel, bad: str) -> None:
    request = history_pb2.GetTrackRequest(device_id=bad)
    await history_pb2_grpc.HistoryStub(channel).GetTrack(request).read()


async def _erase(channel, bad: str) -> None:
    request = history_pb2.EraseDeviceRequest(device_id=bad)
    await history_pb2_grpc.HistoryStub(channel).EraseDevice(request)


CALLS = [  # (call with one bad id, the field it is named by)
    pytest.param(_hello, "hello.device_id", id="track-hello"),
    pytest.param(_rows, "devices[0].device_id", id="publish-rows"),
    pytest.param(_columns, "columns.device_ids[1]", id="publish-columns"),
    pytest.param(_last_positions, "device_ids[1]", id="get-last-positions"),
    pytest.param(_watch, "device_ids[0]", id="watch"),
    pytest.param(_watch_events, "device_ids[1]", id="watch-events"),
    pytest.param(_list_events, "device_id", id="list-events"),
    pytest.param(_track, "device_id", id="get-track"),
    pytest.param(_erase, "device_id", id="erase-device"),
]


# EraseDevice takes ids with edge spaces (data stored before the rule), and refuses
# the rest (tests/test_erase_device.py).
REFUSED = [
    pytest.param(call, field, bad, reason, id=f"{bad_id.id}-{call_id.id}")
    for bad_id in BAD_IDS
    for call_id in CALLS
    for (bad, reason), (call, field) in [(bad_id.values, call_id.values)]
    if not (call is _erase and reason == EDGE_SPACE)
]


@pytest.mark.parametrize(("call", "field", "bad", "reason"), REFUSED)
async def test_a_bad_device_id_is_refused_naming_the_field(
    channel, call, field, bad, reason
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(channel, bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(caught.value) == (field, reason)


async def test_a_refused_columnar_batch_stores_nothing(channel, server) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await _columns(channel, "van-7 ")
    assert await server.app.history.count("default", "van-7") == 0
    assert await server.app.history.count("default", "van-7 ") == 0


def test_a_fix_per_id_batch_names_the_first_bad_id_of_thousands() -> None:
    """Gateways list one id per fix: the 5,000 ids of a batch are checked as their
    distinct values, and the first bad one is named by its place in the list."""
    ids = [f"van-{i % 500}" for i in range(5_000)]
    ids[4_321], ids[4_500] = "van-1 ", "\u2028"
    with pytest.raises(InvalidArgument) as caught:
        check_device_ids(ids, "columns.device_ids")
    assert (caught.value.field, caught.value.reason) == (
        "columns.device_ids[4321]",
        EDGE_SPACE,
    )


@pytest.mark.parametrize(
    "device_id",
    [
        "van-7",
        "a b",
        "x" * 128,
        "x" * 129,
        "",
        " ",
        " a",
        "a ",
        "a\0",
        "a\u00a0",
        "\u2028a",
        "\u200bzero-width",
        "bus ü 日本 🚌",
        "🚌 ",
    ],
)
def test_the_list_check_agrees_with_the_one_id_rule(device_id) -> None:
    """The list check looks at all ids at once; it refuses exactly what the one-id
    rule refuses, wherever the id stands in the list."""
    for ids in ([device_id], ["ok", device_id], [device_id, "ok", device_id]):
        try:
            check_device_ids(ids, "ids")
            refused = None
        except InvalidArgument as error:
            refused = error.reason
        assert refused == device_id_fault(device_id)


def test_ids_that_follow_the_rule_come_back_as_given() -> None:
    ids = ["van-7", "a b", "van-7", "bus ü"]
    assert check_device_ids(ids, "ids") == ids
