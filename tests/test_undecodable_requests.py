"""Request bytes that are not a valid protobuf message, sent to a real server.

Such a request is the caller's mistake: INVALID_ARGUMENT naming the request and the
message type it should have been, and no error logged as if the server had failed.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from tracking.v1 import track_pb2

from tests.server_fixtures import hello, violation

GARBAGE = b"\xff\xff\xff"
TRACK = "/tracking.v1.TrackSession/Track"


def assert_rejected(error: grpc.aio.AioRpcError, message_type: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    field, description = violation(error)
    assert field == "request"
    assert description.startswith(f"is not a valid {message_type}: ")
    assert error.details() == f"request: {description}"


def server_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize(
    ("method", "message_type"),
    [
        pytest.param(
            "/tracking.v1.TrackSession/GetLastPositions",
            "tracking.v1.GetLastPositionsRequest",
            id="unary",
        ),
        pytest.param(
            "/grpc.health.v1.Health/Check",
            "grpc.health.v1.HealthCheckRequest",
            id="unary-other-service",
        ),
    ],
)
async def test_undecodable_unary_request_is_invalid_argument(
    channel, caplog, method, message_type
) -> None:
    call = channel.unary_unary(method)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(GARBAGE)
    assert_rejected(raised.value, message_type)
    assert server_errors(caplog) == []


async def test_undecodable_request_of_a_server_stream_is_invalid_argument(
    channel, caplog
) -> None:
    call = channel.unary_stream("/tracking.v1.TrackSession/Watch")(GARBAGE)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert_rejected(raised.value, "tracking.v1.WatchRequest")
    assert server_errors(caplog) == []


async def test_undecodable_message_after_hello_ends_track_stream(
    channel, caplog
) -> None:
    call = channel.stream_stream(
        TRACK, response_deserializer=track_pb2.TrackResponse.FromString
    )()
    await call.write(hello("bus-9").SerializeToString())
    assert (await call.read()).started.device_id == "bus-9"
    await call.write(GARBAGE)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert_rejected(raised.value, "tracking.v1.TrackRequest")
    assert server_errors(caplog) == []


async def test_undecodable_first_message_ends_track_stream(channel, caplog) -> None:
    call = channel.stream_stream(TRACK)()
    await call.write(GARBAGE)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert_rejected(raised.value, "tracking.v1.TrackRequest")
    assert server_errors(caplog) == []
