"""Replay a trace as a gateway would: columnar ``PublishBatch`` calls, many devices.

Up to ``window`` calls are in flight. A call the server refuses because its storage
is behind is sent again after the delay it names, and the calls made after it wait
until it is answered (``order``): its fixes are not stored after newer ones.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
from tracking.v1 import track_pb2, track_pb2_grpc

from tracking_grpc.client.order import CallOrder, OrderedCall
from tracking_grpc.client.report import ReplayReport
from tracking_grpc.client.schedule import (
    DEFAULT_OPTIONS,
    ReplayOptions,
    batch_bounds,
    stamped_times,
)
from tracking_grpc.client.session import Backoff, SessionStats
from tracking_grpc.client.status import refusal_delay_s
from tracking_grpc.traces import Trace


async def publish_trace(
    stub: track_pb2_grpc.TrackSessionStub,
    trace: Trace,
    options: ReplayOptions = DEFAULT_OPTIONS,
    *,
    metadata: tuple[tuple[str, str], ...] = (),
) -> ReplayReport:
    """Replay ``trace`` as columnar ``PublishBatch`` calls (fixes of many devices)."""
    loop = asyncio.get_running_loop()
    start_clock = loop.time()
    times = stamped_times(trace, options, time.time_ns() // 1_000_000)
    due_ms = options.pace.due_ms(trace.time_ms, int(trace.time_ms[0]))
    stats = SessionStats(device=f"gateway ({len(trace.devices())} devices)")
    report = ReplayReport(
        len(trace),
        int(times[0] - trace.time_ms[0]),
        devices=len(trace.devices()),
        sessions=[stats],
    )

    order = CallOrder()

    async def publish(
        request: track_pb2.PublishBatchRequest, call: OrderedCall
    ) -> None:
        response = await _publish_with_retry(
            stub, request, metadata, options.retry, stats, call
        )
        if response is not None:
            stats.stored += response.stored
            stats.duplicates += response.duplicates
            stats.count_rejections(response)

    # Up to ``window`` calls in flight; each answers once its fixes are durable.
    in_flight: set[asyncio.Task] = set()
    starts = batch_bounds(due_ms, options.tick_ms, options.batch_fixes)
    for a, b in zip(starts, np.r_[starts[1:], len(trace)], strict=True):
        delay_s = start_clock + due_ms[a] / 1000.0 - loop.time()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if len(in_flight) >= options.window:
            _, in_flight = await asyncio.wait(
                in_flight, return_when=asyncio.FIRST_COMPLETED
            )
        if stats.error:
            break
        stats.sent += int(b - a)
        request = track_pb2.PublishBatchRequest(columns=_columns(trace, times, a, b))
        in_flight.add(asyncio.create_task(publish(request, order.call())))
    if in_flight:
        await asyncio.wait(in_flight)
    report.elapsed_s = loop.time() - start_clock
    return report


def _columns(
    trace: Trace, times: np.ndarray, a: int, b: int
) -> track_pb2.ColumnarFixes:
    names, index = np.unique(trace.device[a:b].astype(str), return_inverse=True)
    return track_pb2.ColumnarFixes(
        device_ids=names.tolist(),
        device_index=index.astype(np.uint32),
        seq=trace.seq[a:b],
        time_ms=times[a:b],
        lat=trace.lat[a:b],
        lon=trace.lon[a:b],
        accuracy_m=trace.accuracy_m[a:b],
        altitude_m=trace.altitude_m[a:b],
        speed_mps=trace.speed_mps[a:b],
        heading_deg=trace.heading_deg[a:b],
    )


async def _publish_with_retry(stub, request, metadata, retry, stats, call):
    """Send ``request`` when ``call``'s turn comes, until it is answered; again
    after UNAVAILABLE (the server is away), and after RESOURCE_EXHAUSTED with a
    retry delay (storage is behind: nothing was stored), not before that delay and
    with the backoff's jitter. A refused call holds back the calls made after it
    until it is answered."""
    backoff = Backoff(retry)
    with call:
        await call.turn()
        while True:
            try:
                return await stub.PublishBatch(request, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
                hint_s = refusal_delay_s(exc)
                if exc.code() != grpc.StatusCode.UNAVAILABLE and hint_s is None:
                    stats.error = error
                    return None
                delay_s = backoff.next_delay_s()
                if delay_s is None:
                    stats.error = backoff.gave_up(error)
                    return None
                stats.reconnects += 1
                if hint_s is not None:
                    call.refused()
                await asyncio.sleep((hint_s or 0.0) + delay_s)
                await call.turn()
