"""A simulated watcher: one Watch stream; the age of each update is its latency."""

from __future__ import annotations

import time

import grpc
from tracking.v1 import track_pb2, track_pb2_grpc

from tracking_grpc.loadgen.plan import DriverResult, Plan


async def watch(
    stub: track_pb2_grpc.TrackSessionStub,
    plan: Plan,
    result: DriverResult,
    device_ids: list[str],
    metadata: tuple[tuple[str, str], ...] | None,
) -> None:
    """Read updates until cancelled; fix time -> arrival for fixes of the window."""
    request = track_pb2.WatchRequest(device_ids=device_ids, skip_snapshot=True)
    call = stub.Watch(request, metadata=metadata)
    counts = plan.window.counts
    samples = result.watch_ms
    try:
        async for response in call:
            now_ms = time.time_ns() / 1e6
            times = [p.time_ms for p in response.positions]
            samples.extend(now_ms - t for t in times if counts(t))
            result.count("watch_positions", len(times))
            result.count("watch_messages")
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            result.error(f"watch_{exc.code().name}", detail=exc.details() or "")
    finally:
        call.cancel()
