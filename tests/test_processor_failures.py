"""A processor failing on one device's fixes costs that device only.

Many devices' fixes go to the event processors in one batch; when a processor
raises on it, the batch is tried again split by device, and only the fixes of the
device it still fails on alone are left out (logged and counted). The servers here
are real (embedded store, the real geofence and activity processors); the failure
is injected, by a patched method that raises for one device id while it is armed:
no input makes these processors raise today, and faults of this kind (a bug met
by one device's data or state) are what the splitting is for. The activity faults
are injected at two places: before the processor has applied any row (it has
marked the batch's devices online by then), and in the middle of applying rows
one device at a time, with other devices' rows already applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from tests.server_fixtures import now_ms
from tracking_grpc.activity import processor as activity
from tracking_grpc.activity.params import ActivityConfig
from tracking_grpc.activity.processor import ActivityProcessor
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import EventType, TrackingEvent
from tracking_grpc.geofence import detector
from tracking_grpc.geofence.model import FenceSpec, ShapeSpec
from tracking_grpc.observability import metrics

TENANT = "default"
DEVICES = [f"van-{i:02d}" for i in range(12)]
BAD = "van-05"
FIXES = 30  # per device and batch: one piece for the processors (core.chunks)
STEP_MS, STEP_M = 5_000, 50.0
# A 100 m circle the vans drive through, east then back west.
LAT, LON = 52.52, 13.405
M_PER_DEG_LON = 111_195.0 * np.cos(np.radians(LAT))


class Fault:
    """Raises for the armed devices; counts how often it did."""

    def __init__(self) -> None:
        self.armed: set[str] = set()
        self.raised = 0

    def check(self, devices: Sequence[str]) -> None:
        hit = self.armed.intersection(devices)
        if hit:
            self.raised += 1
            raise RuntimeError(f"injected fault on {sorted(hit)}")


class Seen:
    """The last processor: once it has a batch, the others' events are out."""

    name = "seen"

    def __init__(self) -> None:
        self.fixes = 0
        self.more = asyncio.Event()

    async def process(self, stored: FixBatch) -> list[TrackingEvent]:
        self.fixes += len(stored)
        self.more.set()
        return []

    async def reach(self, fixes: int) -> None:
        async with asyncio.timeout(60):  # a hang guard, not a timing assertion
            while self.fixes < fixes:
                self.more.clear()
                await self.more.wait()


def drive(start_ms: int, first_seq: int, east: bool) -> FixBatch:
    """Every van's FIXES fixes, 50 m apart along one street through the fence
    (from 725 m west of its centre to 725 m east, or back)."""
    k = np.arange(FIXES)
    x_m = -725.0 + STEP_M * k if east else 725.0 - STEP_M * k
    n = len(DEVICES)
    return FixBatch.from_columns(
        TENANT,
        np.repeat(np.array(DEVICES, dtype=object), FIXES),
        np.tile(first_seq + k, n),
        np.tile(start_ms + STEP_MS * k, n) + np.repeat(np.arange(n), FIXES),
        np.full(n * FIXES, LAT),
        np.tile(LON + x_m / M_PER_DEG_LON, n),
        accuracy_m=np.full(n * FIXES, 5.0),
    )


def without(batch: FixBatch, device: str) -> FixBatch:
    return batch.take(batch.device != device)


def by_device(events: list[TrackingEvent]) -> dict[str, list[tuple]]:
    found = defaultdict(list)
    for e in events:
        found[e.device].append((e.type, e.time_ms, e.fix_seq))
    return found


def patch(
    monkeypatch: pytest.MonkeyPatch,
    owner: type,
    name: str,
    devices_of: Callable,
    fault: Fault,
) -> None:
    """Make ``owner.name`` raise for the armed devices among ``devices_of``."""
    original = getattr(owner, name)

    def failing(self, *args, **kwargs):
        fault.check(devices_of(self, *args))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def fail_before_apply(monkeypatch: pytest.MonkeyPatch, fault: Fault) -> None:
    # Asked for the vans' speed limits once the batch's devices are online.
    patch(
        monkeypatch,
        ActivityConfig,
        "speed_limits_mps",
        lambda self, tenant, names: names,
        fault,
    )


def fail_mid_apply(monkeypatch: pytest.MonkeyPatch, fault: Fault) -> None:
    # One device's row at a time, other devices' rows applied before.
    patch(
        monkeypatch,
        activity._Apply,
        "_row",
        lambda self, i: [self.state.names[int(self.slot[i])]],
        fault,
    )


@pytest.mark.parametrize(
    "activity_fault",
    [
        pytest.param(fail_before_apply, id="activity-fault-before-apply"),
        pytest.param(fail_mid_apply, id="activity-fault-mid-apply"),
    ],
)
async def test_one_failing_device_costs_only_its_own_events(
    start_server, monkeypatch, caplog, activity_fault
) -> None:
    geofence_fault, activity_fault_ = Fault(), Fault()
    patch(
        monkeypatch,
        detector._Run,
        "events",
        lambda self, now_ms: self.batch.device.tolist(),
        geofence_fault,
    )
    activity_fault(monkeypatch, activity_fault_)
    server = await start_server(metrics_listen="127.0.0.1:0")
    try:
        app = server.app
        fences = next(p for p in app.pipeline.processors if p.name == "geofence")
        depot = FenceSpec("depot", ShapeSpec.circle(LAT, LON, 100.0))
        await fences.fences.create(TENANT, depot, now_ms())
        fences.changed(TENANT)
        seen = Seen()
        app.pipeline.add_processor(seen)
        got: list[TrackingEvent] = []

        async def collect(events: Sequence[TrackingEvent]) -> None:
            got.extend(events)

        app.bus.add_listener(collect)
        start_ms = now_ms() - 400_000
        first = drive(start_ms, 1, east=True)

        geofence_fault.armed.add(BAD)
        activity_fault_.armed.add(BAD)
        with caplog.at_level(logging.ERROR, "tracking_grpc.isolation"):
            await app.pipeline.ingest(first)
            await seen.reach(len(first))
        geofence_fault.armed.clear()
        activity_fault_.armed.clear()
        assert geofence_fault.raised and activity_fault_.raised  # the fault was met
        first_events = list(got)
        failures = {
            name: (
                metrics.registry().get_sample_value(
                    "tracking_processor_failures_total", {"processor": name}
                ),
                metrics.registry().get_sample_value(
                    "tracking_processor_skipped_fixes_total", {"processor": name}
                ),
            )
            for name in ("geofence", "activity")
        }

        second = drive(start_ms + 200_000, FIXES + 1, east=False)
        await app.pipeline.ingest(second)
        await seen.reach(len(first) + len(second))
    finally:
        metrics.disable()

    # Every other van entered and left the fence once; the failing one did not.
    fence_events = by_device([e for e in first_events if e.fence_id == "depot"])
    assert BAD not in fence_events
    for device in set(DEVICES) - {BAD}:
        kinds = [kind for kind, _, _ in fence_events[device]]
        assert kinds == [EventType.ENTER, EventType.EXIT], device

    # Their activity is what it is without the failing van: none lost, none twice.
    reference = ActivityProcessor(app.activity.config).apply(without(first, BAD), 0)
    activity_events = [e for e in first_events if e.fence_id == ""]
    assert by_device(activity_events) == by_device(reference)
    ids = [e.event_id for e in first_events]
    assert len(ids) == len(set(ids))

    # The failing van's fixes were logged once per processor and counted.
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for name in ("geofence", "activity"):
        [line] = [text for text in lines if text.startswith(f"processor {name} failed")]
        assert f"on device '{BAD}' of tenant {TENANT}" in line
        assert f"its {FIXES} fixes (seq 1-{FIXES})" in line
        assert "injected fault on ['van-05']" in line
    assert failures == {"geofence": (1.0, FIXES), "activity": (1.0, FIXES)}

    # Its next batch is processed as any other: in and out of the fence again.
    later = by_device([e for e in got[len(first_events) :] if e.fence_id])
    assert [kind for kind, _, _ in later[BAD]] == [EventType.ENTER, EventType.EXIT]
    assert by_device(got[len(first_events) :])[BAD][0][0] == EventType.ONLINE
