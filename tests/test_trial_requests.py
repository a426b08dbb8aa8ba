"""Requests and commands a new user's trial ran, against a real server on port 0:
each refusal names the field and the reason."""

from __future__ import annotations

import logging

import grpc
import pytest
from tracking.v1 import history_pb2, history_pb2_grpc

from tests.server_fixtures import batch, fix, hello, now_ms, violation

DAY_MS = 86_400_000


@pytest.mark.parametrize(
    ("fence_ids", "field", "words"),
    [
        pytest.param(["nope", ""], "fence_ids[1]", "must not be empty", id="empty"),
        pytest.param(
            ["bad id!"], "fence_ids[0]", "1 to 128 letters", id="not-a-fence-id"
        ),
        # Repeats count: a list is refused by its length, not walked id by id.
        pytest.param(["a"] * 10_001, "fence_ids", "at most 10000", id="too-many"),
    ],
)
async def test_time_in_fences_refuses_a_malformed_fence_id(
    channel, fence_ids, field, words
) -> None:
    """INVALID_ARGUMENT, as GetFence("") is; not NOT_FOUND for a fence that could
    not exist."""
    stub = history_pb2_grpc.HistoryStub(channel)
    end = now_ms()
    request = history_pb2.TimeInFencesRequest(
        device_id="d", start_ms=end - DAY_MS, end_ms=end, fence_ids=fence_ids
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.TimeInFences(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(caught.value)[0] == field
    assert words in violation(caught.value)[1]


async def test_a_repeated_hello_of_the_same_device_is_ignored(stub, server) -> None:
    """As the Track contract says: no second SessionStarted, the stream goes on."""
    call = stub.Track()
    await call.write(hello("d"))
    assert (await call.read()).WhichOneof("message") == "started"
    await call.write(hello("d", resume_from_seq=1, want_events=True))
    await call.write(batch([fix(1, 45.0, 7.0)]))
    reply = await call.read()
    assert reply.WhichOneof("message") == "ack"
    assert (reply.ack.acked_seq, reply.ack.stored) == (1, 1)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF


ROUTE_LOG = "tracking_grpc.servicers.route"


def route_not_ready(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [
        r.levelno
        for r in caplog.records
        if r.name == ROUTE_LOG and "Route service not ready" in r.getMessage()
    ]


async def test_routing_off_by_default_is_logged_at_info(start_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger=ROUTE_LOG)
    await start_server()
    assert route_not_ready(caplog) == [logging.INFO]


async def test_an_unusable_routing_data_dir_is_a_warning(
    start_server, caplog, tmp_path
) -> None:
    empty = tmp_path / "no-routing-data"
    empty.mkdir()
    caplog.set_level(logging.INFO, logger=ROUTE_LOG)
    await start_server(routing_data_dir=str(empty))
    assert route_not_ready(caplog) == [logging.WARNING]
