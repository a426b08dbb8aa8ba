"""Metric recording: off by default, counts when on, sums over worker processes."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry, multiprocess

from tracking_grpc.events import EventType
from tracking_grpc.observability import metrics
from tracking_grpc.observability.runtime import RuntimeMonitor


@pytest.fixture
def registry():
    yield metrics.enable()
    metrics.disable()


def test_recording_while_off_changes_nothing():
    metrics.disable()
    metrics.fixes_received(5)
    metrics.fixes_rejected_codes([1, 1])
    assert not metrics.enabled()


def test_fix_counters_add_up(registry):
    metrics.fixes_received(10)
    metrics.fixes_accepted(7)
    metrics.fixes_deduplicated(2)
    metrics.fixes_rejected_codes([5, 5, 1])
    value = registry.get_sample_value
    assert value("tracking_fixes_received_total") == 10
    assert value("tracking_fixes_accepted_total") == 7
    assert value("tracking_fixes_deduplicated_total") == 2
    assert value("tracking_fixes_rejected_total", {"reason": "future_time"}) == 2
    assert (
        value("tracking_fixes_rejected_total", {"reason": "latitude_out_of_range"}) == 1
    )


def test_acks_timed_many_at_once_equal_acks_timed_one_by_one():
    """metrics.fixes_acked (one call per group commit) fills the ack histogram as
    one observe per message would, values on bucket edges included."""
    received = [10_000 - ms for ms in (0, 0.5, 0.7, 1, 2.5, 9, 10, 10.2, 800, 12e3)]
    samples = {}
    for many in (False, True):
        registry = metrics.enable()
        if many:
            metrics.fixes_acked(10_000, received[:-1])
            metrics.fixes_acked(10_000, [])
            metrics.fixes_acked(10_000, received[-1:])
        else:
            for ms in received:
                metrics.fix_acked((10_000 - ms) / 1000)
        samples[many] = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            if family.name == "tracking_fix_ack_seconds"
            for s in family.samples
            if not s.name.endswith("_created")
        }
        metrics.disable()
    assert samples[True] == pytest.approx(samples[False])
    assert samples[True][("tracking_fix_ack_seconds_count", ())] == len(received)


def test_events_are_counted_by_type(registry):
    metrics.events_emitted([EventType.ENTER, EventType.ENTER, EventType.EXIT])
    value = registry.get_sample_value
    assert value("tracking_events_total", {"type": "enter"}) == 2
    assert value("tracking_events_total", {"type": "exit"}) == 1


def test_a_failed_flush_is_counted_and_not_timed(registry):
    with pytest.raises(OSError), metrics.timed_flush("sqlite", 40):
        raise OSError("disk full")
    with metrics.timed_flush("sqlite", 60):
        pass
    value = registry.get_sample_value
    assert value("tracking_storage_flush_failures_total", {"backend": "sqlite"}) == 1
    assert value("tracking_storage_batch_fixes_sum", {"backend": "sqlite"}) == 60


async def test_gc_pauses_are_timed_by_generation(registry):
    count = registry.get_sample_value
    monitor = RuntimeMonitor(lag_sample_s=0.01)
    monitor.start()
    try:
        garbage = [[] for _ in range(1000)]
        for item in garbage:
            item.append(item)  # cycles only the collector frees
        del garbage, item
        gc.collect(0)
        gc.collect(2)
        # The collector's callback only notes a pause (it may run while this
        # thread holds a metric's lock); the loop's sampler records it.
        assert count("tracking_gc_pause_seconds_count", {"generation": "2"}) is None
        await asyncio.sleep(0.05)
        full = count("tracking_gc_pause_seconds_count", {"generation": "2"})
        assert full >= 1
    finally:
        await monitor.stop()
    young = count("tracking_gc_pause_seconds_count", {"generation": "0"})
    assert young >= 1
    assert count("tracking_gc_pause_seconds_sum", {"generation": "2"}) > 0
    full = count("tracking_gc_pause_seconds_count", {"generation": "2"})
    gc.collect(2)  # stopped: no longer timed
    await asyncio.sleep(0.05)
    assert count("tracking_gc_pause_seconds_count", {"generation": "2"}) == full


async def test_a_blocked_event_loop_shows_as_lag(registry):
    monitor = RuntimeMonitor(lag_sample_s=0.01)
    monitor.start()
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # noqa: ASYNC251 - a handler that holds the loop
        await asyncio.sleep(0.05)
    finally:
        await monitor.stop()
    count = registry.get_sample_value
    bucket = "tracking_event_loop_lag_seconds_bucket"
    samples = count("tracking_event_loop_lag_seconds_count")
    blocked = count(bucket, {"le": "0.25"}) - count(bucket, {"le": "0.1"})
    assert samples >= 3
    assert blocked >= 1  # the sample that waited out the 0.2 s block


WORKER = """
from tracking_grpc.observability import metrics
from tracking_grpc.observability.runtime import RuntimeMonitor
metrics.enable()
metrics.fixes_received({n})
metrics.stream_opened("/tracking.v1.TrackSession/Track")
"""


def test_worker_processes_are_summed(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    for n in (3, 4):
        subprocess.run([sys.executable, "-c", WORKER.format(n=n)], check=True)
    first_pid = min(_pids(tmp_path, "gauge_livesum"))
    metrics.worker_exited(first_pid)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    track = {"method": "/tracking.v1.TrackSession/Track"}
    assert registry.get_sample_value("tracking_fixes_received_total") == 7
    assert registry.get_sample_value("tracking_streams_open", track) == 1


def _pids(path, kind: str) -> set[int]:
    return {int(p.stem.rsplit("_", 1)[1]) for p in path.glob(f"{kind}_*.db")}
