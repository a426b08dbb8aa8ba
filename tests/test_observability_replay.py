"""A real trace replayed through a real server, scraped by a real Prometheus.

The Porto taxi trips span four months: with the age limit set inside the largest gap
between fix times, every fix before the gap is rejected as ancient. The trace is sent
twice, so the second pass is all duplicates (or ancient again). The counters that
Prometheus scrapes must equal those numbers, computed here from the trace itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import numpy as np
import pytest
from tracking.v1 import track_pb2, track_pb2_grpc

from tests.conftest import TRACES, require_shared
from tests.prometheus_server import PrometheusServer
from tests.server_fixtures import embedded_settings, now_ms
from tracking_grpc.traces import Trace, read_trace

CHUNK = 2_000
PORTO = "porto_taxi_test320.csv"


def recent_trace(name: str) -> Trace:
    trace = read_trace(require_shared(TRACES / name))
    return trace.shifted(now_ms() - 60_000 - int(trace.time_ms.max()))


def age_limit_in_largest_gap(trace: Trace) -> tuple[float, int]:
    """An age limit (s) in the middle of the largest gap, and the fixes older."""
    times = np.unique(trace.time_ms)
    gap = int(np.argmax(np.diff(times)))
    cut_ms = (int(times[gap]) + int(times[gap + 1])) // 2
    return (now_ms() - cut_ms) / 1000, int((trace.time_ms < cut_ms).sum())


def columns(trace: Trace) -> track_pb2.PublishBatchRequest:
    ids, index = np.unique(trace.device.astype(str), return_inverse=True)
    return track_pb2.PublishBatchRequest(
        columns=track_pb2.ColumnarFixes(
            device_ids=ids.tolist(),
            device_index=index.tolist(),
            seq=trace.seq.tolist(),
            time_ms=trace.time_ms.tolist(),
            lat=trace.lat.tolist(),
            lon=trace.lon.tolist(),
        )
    )


@contextlib.asynccontextmanager
async def grpc_stub(server) -> AsyncIterator[track_pb2_grpc.TrackSessionStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield track_pb2_grpc.TrackSessionStub(channel)


async def replay(stub, trace: Trace) -> dict[str, int]:
    totals = {"stored": 0, "duplicates": 0, "rejected": 0}
    for start in range(0, len(trace), CHUNK):
        chunk = trace.take(np.arange(start, min(start + CHUNK, len(trace))))
        answer = await stub.PublishBatch(columns(chunk))
        totals["stored"] += answer.stored
        totals["duplicates"] += answer.duplicates
        totals["rejected"] += answer.rejected
    return totals


@pytest.mark.slow
async def test_scraped_counters_equal_the_replay(start_server, tmp_path):
    trace = recent_trace(PORTO)
    max_age_s, ancient = age_limit_in_largest_gap(trace)
    settings = embedded_settings(tmp_path, metrics_listen="127.0.0.1:0")
    server = await start_server(settings=replace(settings, max_fix_age_s=max_age_s))
    target = f"127.0.0.1:{server.telemetry.metrics_port}"
    with PrometheusServer(tmp_path, [target]) as prometheus:
        async with grpc_stub(server) as stub:
            first = await replay(stub, trace)
            second = await replay(stub, trace)
        stored = await server.app.history.count("default")
        expected = {
            "sum(tracking_fixes_received_total)": 2 * len(trace),
            'sum(tracking_fixes_rejected_total{reason="ancient_time"})': 2 * ancient,
            "sum(tracking_fixes_accepted_total)": stored,
            "sum(tracking_fixes_deduplicated_total)": len(trace)
            - ancient
            + first["duplicates"],
        }
        scraped = {
            query: await asyncio.to_thread(prometheus.wait_for, query, float(value))
            for query, value in expected.items()
        }
    assert (first["rejected"], second["rejected"]) == (ancient, ancient)
    assert first["stored"] == stored > 0 and second["stored"] == 0
    assert scraped == {query: float(value) for query, value in expected.items()}


async def test_processing_lag_is_recorded_per_processed_piece(start_server, tmp_path):
    """Each piece the processors finish records how long after receipt of its
    oldest fix that was (``tracking_processing_lag_seconds``)."""
    trace = recent_trace(PORTO)
    trace = trace.take(np.argsort(trace.time_ms)[-3_000:])  # the recent end
    settings = embedded_settings(tmp_path, metrics_listen="127.0.0.1:0")
    server = await start_server(settings=settings)
    url = f"http://127.0.0.1:{server.telemetry.metrics_port}/metrics"
    async with grpc_stub(server) as stub:
        assert (await replay(stub, trace))["stored"] > 0

    def pieces_recorded() -> float:
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        for line in text.splitlines():
            if line.startswith("tracking_processing_lag_seconds_count"):
                return float(line.split()[-1])
        return 0.0

    for _ in range(600):  # hang guard: the pipeline processes within a second
        if await asyncio.to_thread(pieces_recorded) >= 1:
            break
        await asyncio.sleep(0.05)
    assert await asyncio.to_thread(pieces_recorded) >= 1
