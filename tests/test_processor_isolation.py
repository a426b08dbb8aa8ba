"""Retrying a failed batch by device (``isolation``): with the route monitor, and the
bounds on what a processor failing on everything costs.

The route monitor here is the real one on straight planned routes; its failure is
injected (a patched round that raises for one device while armed), since no input
makes it raise today. The other processors are small test processors whose failing
is their whole point.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import pytest

from tracking_grpc import isolation
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import EventType, TrackingEvent, event_id
from tracking_grpc.observability import metrics
from tracking_grpc.routing.monitor import PlannedRoute, RouteMonitor

TENANT = "t"
LAT, LON = 60.0, 24.0
M_PER_DEG = 111_195.0
START_MS = 1_767_225_600_000


def routes(devices: list[str]) -> list[PlannedRoute]:
    """A straight 1.8 km route north for each device, 100 m per segment."""
    north_m = np.arange(0, 1_801, 100.0)
    lat = LAT + north_m / M_PER_DEG
    lon = np.full(lat.size, LON)
    seconds = np.full(lat.size - 1, 10.0)
    return [PlannedRoute(TENANT, d, "r1", lat, lon, seconds, START_MS) for d in devices]


def drive(devices: list[str]) -> FixBatch:
    """Each device 50 m per fix up its route, its first four fixes 300 m east of
    it (OFF_ROUTE at the third, BACK_ON_ROUTE at the sixth)."""
    k = np.arange(40)
    north_m = 50.0 * k
    east_m = np.where(k < 4, 300.0, 0.0)
    n = len(devices)
    lat = LAT + north_m / M_PER_DEG
    lon = LON + east_m / (M_PER_DEG * np.cos(np.radians(LAT)))
    return FixBatch.from_columns(
        TENANT,
        np.repeat(np.array(devices, dtype=object), k.size),
        np.tile(k + 1, n),
        np.tile(START_MS + 5_000 * k, n),
        np.tile(lat, n),
        np.tile(lon, n),
        accuracy_m=np.full(n * k.size, 5.0),
    )


def by_device(events: list[TrackingEvent]) -> dict[str, list[tuple]]:
    found = defaultdict(list)
    for e in events:
        found[e.device].append((e.type, e.time_ms, e.fix_seq, e.event_id))
    return found


async def test_a_route_failing_mid_batch_costs_only_its_device(monkeypatch) -> None:
    devices = [f"bus-{i}" for i in range(6)]
    bad = "bus-3"
    monitor = RouteMonitor()
    for route in routes(devices):
        monitor.assign(route)
    original = RouteMonitor._round
    armed = {bad}

    def failing(self, stored, rows, slots, created_ms):
        names = {self._routes[s].device for s in slots.tolist()}
        # Six rounds in: every device is off the route and back already.
        if armed & names and stored.seq[rows].min() > 6:
            raise RuntimeError("injected fault")
        return original(self, stored, rows, slots, created_ms)

    monkeypatch.setattr(RouteMonitor, "_round", failing)
    batch = drive(devices)

    async def run(part: FixBatch) -> list[TrackingEvent]:
        return monitor.evaluate(part, 0)

    with pytest.raises(RuntimeError):
        await run(batch)
    events = await isolation.by_device(
        "routes", batch, run, RuntimeError("injected fault")
    )

    reference = RouteMonitor()
    for route in routes([d for d in devices if d != bad]):
        reference.assign(route)
    expected = reference.evaluate(batch.take(batch.device != bad), 0)
    assert by_device(events) == by_device(expected)
    kinds = [e.type for e in expected if e.device == "bus-0"]
    assert kinds[:2] == [EventType.OFF_ROUTE, EventType.BACK_ON_ROUTE]
    assert kinds[-1] == EventType.ARRIVED

    # Its next fixes go through: it is where the state before the batch left it.
    armed.clear()
    later = monitor.evaluate(batch.take(batch.device == bad), 0)
    assert [e.type for e in later if e.type != EventType.ETA_UPDATED] == [
        EventType.OFF_ROUTE,
        EventType.BACK_ON_ROUTE,
        EventType.ARRIVED,
    ]


class Echo:
    """One event per fix; fails on the fixes of ``failing`` devices, or on the
    first ``once`` calls whatever they hold."""

    name = "echo"

    def __init__(self, failing: set[str] | None = None, once: int = 0) -> None:
        self.failing = failing
        self.once = once
        self.calls = 0

    async def process(self, stored: FixBatch) -> list[TrackingEvent]:
        self.calls += 1
        if self.once:
            self.once -= 1
            raise ValueError("transient (test)")
        devices = stored.device.tolist()
        if self.failing is None or self.failing.intersection(devices):
            raise ValueError("fails (test)")
        return [
            TrackingEvent(
                event_id(TENANT, d, EventType.ENTER, t, "f"),
                TENANT,
                d,
                EventType.ENTER,
                t,
                0.0,
                0.0,
                s,
                0,
                fence_id="f",
            )
            for d, t, s in zip(
                devices, stored.time_ms.tolist(), stored.seq.tolist(), strict=True
            )
        ]


def fleet(devices: int, fixes: int = 3) -> FixBatch:
    names = np.array([f"d{i:03d}" for i in range(devices)], dtype=object)
    k = np.arange(1, fixes + 1)
    return FixBatch.from_columns(
        TENANT,
        np.repeat(names, fixes),
        np.tile(k, devices),
        np.tile(START_MS + 1_000 * k, devices),
        np.full(devices * fixes, LAT),
        np.full(devices * fixes, LON),
    )


async def test_events_keep_the_batch_order_around_failing_devices() -> None:
    batch = fleet(10)
    processor = Echo(failing={"d002", "d007"})
    events = await isolation.by_device(
        "echo", batch, processor.process, ValueError("fails (test)")
    )
    kept = batch.take(~np.isin(batch.device, ["d002", "d007"]))
    assert [(e.device, e.fix_seq) for e in events] == list(
        zip(kept.device.tolist(), kept.seq.tolist(), strict=True)
    )


async def test_a_processor_failing_on_everything_costs_no_call_per_device(
    caplog,
) -> None:
    registry = metrics.enable()
    try:
        batch = fleet(200)
        processor = Echo()
        with caplog.at_level(logging.ERROR, "tracking_grpc.isolation"):
            events = await isolation.by_device(
                "echo", batch, processor.process, ValueError("fails (test)")
            )
        devices = registry.get_sample_value(
            "tracking_processor_failures_total", {"processor": "echo"}
        )
        fixes = registry.get_sample_value(
            "tracking_processor_skipped_fixes_total", {"processor": "echo"}
        )
    finally:
        metrics.disable()
    assert events == []
    assert (devices, fixes) == (200, len(batch))
    assert processor.calls < 60  # 200 devices: not one call each
    lines = [r.getMessage() for r in caplog.records]
    singles = [line for line in lines if "on device 'd" in line]
    # One by one until MAX_LEFT_OUT are out (a part of one device counts alone).
    assert isolation.MAX_LEFT_OUT <= len(singles) <= isolation.MAX_LEFT_OUT + 1
    assert len(lines) < 20
    assert all("not split further" in t for t in lines if t not in singles)


async def test_a_batch_that_fails_once_loses_nothing(caplog) -> None:
    batch = fleet(4)
    processor = Echo(failing=set(), once=1)
    with pytest.raises(ValueError):
        await processor.process(batch)
    with caplog.at_level(logging.WARNING, "tracking_grpc.isolation"):
        events = await isolation.by_device(
            "echo", batch, processor.process, ValueError("transient (test)")
        )
    assert len(events) == len(batch)
    [line] = [r.getMessage() for r in caplog.records]
    assert "but not on their devices apart; no fixes left out" in line


async def test_a_one_device_batch_that_fails_once_loses_nothing(caplog) -> None:
    # No halves to try it in: the batch is tried once more whole.
    batch = fleet(1)
    processor = Echo(failing=set(), once=1)
    with pytest.raises(ValueError):
        await processor.process(batch)
    with caplog.at_level(logging.WARNING, "tracking_grpc.isolation"):
        events = await isolation.by_device(
            "echo", batch, processor.process, ValueError("transient (test)")
        )
    assert [(e.device, e.fix_seq) for e in events] == [
        ("d000", 1),
        ("d000", 2),
        ("d000", 3),
    ]
    [line] = [r.getMessage() for r in caplog.records]
    assert "of device 'd000'" in line and "not when tried again" in line


async def test_a_one_device_batch_failing_again_is_left_out(caplog) -> None:
    batch = fleet(1)
    processor = Echo()
    with caplog.at_level(logging.ERROR, "tracking_grpc.isolation"):
        events = await isolation.by_device(
            "echo", batch, processor.process, ValueError("fails (test)")
        )
    assert events == [] and processor.calls == 1
    [line] = [r.getMessage() for r in caplog.records]
    assert "failed on device 'd000'" in line and "seq 1-3" in line
