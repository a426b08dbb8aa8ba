"""What a failed call's status says about sending it again."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


def retry_delay_s(error: grpc.aio.AioRpcError) -> float | None:
    """The wait a ``google.rpc.RetryInfo`` in the status details asks for, or None.

    The server sends one with RESOURCE_EXHAUSTED when it refused a ``PublishBatch``
    call because storage is behind: nothing of the call was stored, and the same
    request may be sent again after the wait.
    """
    for key, value in error.trailing_metadata() or ():
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return info.retry_delay.ToMilliseconds() / 1000
    return None


def refusal_delay_s(error: grpc.aio.AioRpcError) -> float | None:
    """How long to wait before sending a refused call again: the RetryInfo delay of
    a RESOURCE_EXHAUSTED (storage is behind, nothing stored); None for any other
    error, which a retry would not mend."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    return retry_delay_s(error)
