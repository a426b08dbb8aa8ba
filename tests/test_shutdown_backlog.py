"""A stop honours its grace however far the event processors are behind.

After a gateway burst the processors can be minutes behind the acks. A stop gives
them until its grace ends; the stored fixes they have not begun by then are left,
logged per tenant with their times, and counted in
``tracking_fixes_unprocessed_total``.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
from tracking.v1 import track_pb2, track_pb2_grpc

from tests.server_fixtures import now_ms
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import TrackingEvent
from tracking_grpc.observability import metrics

DEVICES, FIXES_PER_DEVICE = 10, 5_000  # 40 pieces for the processors (core.chunks)
HANG_GUARD_S = 120.0


class PatientCounter:
    """A processor that takes a while over every piece and counts the fixes it
    was given: a burst leaves it a backlog a stop must not wait out."""

    name = "patient-counter"

    def __init__(self) -> None:
        self.fixes = 0

    async def process(self, stored: FixBatch) -> list[TrackingEvent]:
        self.fixes += len(stored)
        await asyncio.sleep(0.05)
        return []


def burst() -> track_pb2.PublishBatchRequest:
    """Every device's fixes 100 ms apart over the last ten minutes."""
    n = DEVICES * FIXES_PER_DEVICE
    seq = np.tile(np.arange(1, FIXES_PER_DEVICE + 1), DEVICES)
    columns = track_pb2.ColumnarFixes(
        device_ids=[f"gw-van-{i}" for i in range(DEVICES)],
        device_index=np.repeat(np.arange(DEVICES), FIXES_PER_DEVICE).tolist(),
        seq=seq.tolist(),
        time_ms=(now_ms() - 600_000 + seq * 100).tolist(),
        lat=(60.0 + np.arange(n) * 1e-6).tolist(),
        lon=[25.0] * n,
    )
    return track_pb2.PublishBatchRequest(columns=columns)


async def test_stop_leaves_the_processors_backlog_at_its_deadline(
    start_server, caplog
) -> None:
    server = await start_server(metrics_listen="127.0.0.1:0")
    counter = PatientCounter()
    server.app.pipeline.add_processor(counter)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = track_pb2_grpc.TrackSessionStub(channel)
            answer = await stub.PublishBatch(burst())
        assert answer.stored == DEVICES * FIXES_PER_DEVICE
        with caplog.at_level(logging.WARNING, "tracking_grpc.backlog"):
            async with asyncio.timeout(HANG_GUARD_S):
                await server.stop(0)
        left = metrics.registry().get_sample_value("tracking_fixes_unprocessed_total")
    finally:
        metrics.disable()

    assert left is not None and left > 0
    assert counter.fixes + left == answer.stored  # each fix processed or counted
    lines = [r.getMessage() for r in caplog.records]
    [line] = [text for text in lines if "unprocessed" in text]
    assert f"{int(left)} stored fixes of {DEVICES} devices left unprocessed" in line


async def test_a_stop_within_its_grace_processes_the_whole_backlog(
    start_server,
) -> None:
    server = await start_server()
    counter = PatientCounter()
    server.app.pipeline.add_processor(counter)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answer = await track_pb2_grpc.TrackSessionStub(channel).PublishBatch(burst())
    async with asyncio.timeout(HANG_GUARD_S):
        await server.stop(HANG_GUARD_S)
    assert counter.fixes == answer.stored
