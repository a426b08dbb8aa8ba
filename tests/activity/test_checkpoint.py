"""Checkpoints: a trace processed across a restart gives what it gives in one go.

The fixes go through a real history store (SQLite and PostgreSQL) before the
processor sees them, as in the server. A "restart" is a new processor on the same
store: it restores each device from its checkpoint when the device's next fix
arrives. After a clean stop the checkpoint covers every applied fix; after a crash
the fixes applied since the last checkpoint are applied again, and their events
come again with the same ids.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from tests.backends import unique_tenant
from tests.conftest import TRACES, require_shared
from tracking_grpc.activity import processor as processor_module
from tracking_grpc.activity.processor import ActivityProcessor
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import StorageUnavailable
from tracking_grpc.events import EventType
from tracking_grpc.traces import read_trace

CHUNK = 40  # fixes per processed batch, across devices in fix-time order


@pytest.fixture
def history(history_store):
    """The history store of each backend (tests.backends.history_store)."""
    return history_store


def trace_chunks(name: str, tenant: str) -> list[FixBatch]:
    """The trace in fix-time order, received now (no device looks offline)."""
    batch = read_trace(require_shared(TRACES / name)).to_batch(tenant)
    batch = batch.with_received(time.time_ns() // 1_000_000)
    batch = batch.take(np.argsort(batch.time_ms, kind="stable"))
    return [
        batch.take(np.arange(i, min(i + CHUNK, len(batch)))).sorted_by_device_time()
        for i in range(0, len(batch), CHUNK)
    ]


async def run(processor: ActivityProcessor, history, chunks) -> list:
    """Store each chunk (if there is a store), then process it; every event."""
    events = []
    for chunk in chunks:
        if history is not None:
            await history.store(chunk)
        events += await processor.process(chunk)
    return events


def by_id(events, kinds=None) -> dict:
    """Events by id: type, time and fix, and (for all kinds) the detail's values,
    rounded to the centimetre (a sum taken in bulk or fix by fix differs in the
    last digits)."""
    return {
        e.event_id: (e.type, e.time_ms, e.fix_seq, _rounded(e.activity, kinds))
        for e in events
        if kinds is None or e.type in kinds
    }


def _rounded(detail, kinds) -> tuple:
    if detail is None or kinds is not None:
        return ()
    return tuple(round(float(v), 2) for v in dataclasses.astuple(detail))


async def assert_same_state(restored, reference, tenant, devices) -> None:
    """Devices that sent nothing since the restart are read as GetActivity does."""
    for device in devices:
        got = await restored.current(tenant, device)
        want = reference.state(tenant, device)
        assert got.odometer_m == pytest.approx(want.odometer_m, abs=1.0), device
        assert got.trip_distance_m == pytest.approx(want.trip_distance_m, abs=1.0)
        same = ("in_stop", "stop_since_ms", "in_trip", "trip_since_ms", "motion")
        assert [getattr(got, f) for f in same] == [getattr(want, f) for f in same]
        assert (got.time_ms, got.lat, got.lon) == (want.time_ms, want.lat, want.lon)
        assert got.smoothed_lat == pytest.approx(want.smoothed_lat, abs=1e-6)


BUSES, CAR = "liverpool_bus_route14_outbound.csv", "gpxpy_around-visnjan-with-car.gpx"
# What a crash replays exactly. Motion depends on how fixes are cut into batches,
# restart or not (a new motion settles within a batch or across two), and a replay
# takes a device's fixes since the checkpoint as one batch with its next: its
# MOTION_CHANGED events may differ from those of the batches before the crash.
PLACES = {
    EventType.ONLINE,
    EventType.STOP_STARTED,
    EventType.STOP_ENDED,
    EventType.TRIP_STARTED,
    EventType.TRIP_ENDED,
}


@pytest.mark.parametrize(
    ("trace", "applied_since_checkpoint"),
    [
        pytest.param(BUSES, 0, id="buses-clean-stop"),
        pytest.param(BUSES, 6, id="buses-crash"),
        pytest.param(CAR, 0, id="car-clean-stop"),
        pytest.param(CAR, 6, id="car-crash"),
    ],
)
async def test_a_restart_continues_the_activity(
    history, trace, applied_since_checkpoint
) -> None:
    tenant = unique_tenant()
    chunks = trace_chunks(trace, tenant)
    cut = len(chunks) // 2
    kinds = PLACES if applied_since_checkpoint else None
    # The replay applies the fixes since the checkpoint together with the next.
    end = cut + applied_since_checkpoint + 1
    batches = [*chunks[:cut], FixBatch.concat(chunks[cut:end]), *chunks[end:]]
    reference = ActivityProcessor()
    expected = by_id(await run(reference, None, batches), kinds)

    before = ActivityProcessor(store=history)
    seen = by_id(await run(before, history, chunks[:cut]), kinds)
    assert await before.save_checkpoints() > 0
    crashed = chunks[cut : cut + applied_since_checkpoint]
    replayed = by_id(await run(before, history, crashed), kinds)  # then it crashed

    after = ActivityProcessor(store=history)
    rest = by_id(await run(after, history, chunks[cut + len(crashed) :]), kinds)

    assert {**seen, **replayed, **rest} == expected
    assert replayed.keys() <= rest.keys()  # raised again, with the same ids
    assert seen.keys().isdisjoint(rest.keys())  # what was saved is not raised again
    devices = np.unique(np.concatenate([c.device for c in chunks]).astype(str))
    await assert_same_state(after, reference, tenant, devices.tolist())


async def test_a_device_without_a_checkpoint_starts_afresh(history) -> None:
    tenant = unique_tenant()
    chunks = trace_chunks(CAR, tenant)
    cut = len(chunks) // 2
    before = ActivityProcessor(store=history)  # saves nothing
    await run(before, history, chunks[:cut])
    device = str(chunks[0].device[0])
    assert before.state(tenant, device).odometer_m > 1000.0
    after, fresh = ActivityProcessor(store=history), ActivityProcessor()
    await run(after, history, chunks[cut : cut + 1])
    await run(fresh, None, chunks[cut : cut + 1])
    assert after.state(tenant, device) == fresh.state(tenant, device)
    assert await after.current(tenant, "never-seen") is None


async def test_a_restore_beside_many_new_devices(history) -> None:
    tenant = unique_tenant()
    chunks = trace_chunks(CAR, tenant)
    cut = len(chunks) // 2
    before = ActivityProcessor(store=history)
    await run(before, history, chunks[:cut])
    await before.save_checkpoints()
    first = chunks[cut]
    newcomers = FixBatch.from_columns(
        tenant,
        [f"new-{i:03d}" for i in range(100)],
        np.ones(100),
        np.full(100, first.time_ms[0]),
        np.full(100, 45.0),
        np.full(100, 13.0),
    ).with_received(int(first.received_ms[0]))

    after = ActivityProcessor(store=history)  # its columns grow on the way
    await run(after, history, [FixBatch.concat([first, newcomers])])

    device = str(first.device[0])
    assert (
        after.state(tenant, device).odometer_m > before.state(tenant, device).odometer_m
    )
    assert after.state(tenant, "new-099").online


async def test_a_device_back_from_another_process_continues_there(history) -> None:
    """Its fixes went to another process for a while (it went offline here):
    this process takes the other's newer checkpoint instead of its own state."""
    tenant = unique_tenant()
    chunks = trace_chunks(CAR, tenant)
    third = len(chunks) // 3
    reference = ActivityProcessor()
    await run(reference, None, chunks)
    here, there = ActivityProcessor(store=history), ActivityProcessor(store=history)
    await run(here, history, chunks[:third])
    await here.save_checkpoints()
    await run(there, history, chunks[third : 2 * third])
    await there.save_checkpoints()
    await here.tick(time.time_ns() // 1_000_000 + 3_600_000)  # offline here

    await run(here, history, chunks[2 * third :])

    device = str(chunks[0].device[0])
    got, want = here.state(tenant, device), reference.state(tenant, device)
    assert got.odometer_m == pytest.approx(want.odometer_m, abs=1.0)
    assert (got.in_trip, got.trip_since_ms) == (want.in_trip, want.trip_since_ms)


async def test_a_device_gone_to_another_process_goes_offline_there_only(
    history,
) -> None:
    """Its fixes went to another process: this one raises no OFFLINE of it when
    it falls silent here (listeners would hear of a device online elsewhere as
    gone) and drops its state; the other raises the OFFLINE."""
    tenant = unique_tenant()
    chunks = trace_chunks(CAR, tenant)
    half = len(chunks) // 2
    here, there = ActivityProcessor(store=history), ActivityProcessor(store=history)
    await run(here, history, chunks[:half])
    await here.save_checkpoints()
    await run(there, history, chunks[half:])
    await there.save_checkpoints()
    later_ms = time.time_ns() // 1_000_000 + 3_600_000

    assert await here.tick(later_ms) == []
    assert [e.type for e in await there.tick(later_ms)] == [EventType.OFFLINE]
    assert here.state(tenant, str(chunks[0].device[0])) is None


class CountingReads:
    """A store that counts the checkpoint reads made through it."""

    def __init__(self, store) -> None:
        self.store, self.loads = store, 0

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    async def load_checkpoints(self, tenant, devices):
        self.loads += 1
        return await self.store.load_checkpoints(tenant, devices)


async def test_devices_already_held_cost_no_read(history) -> None:
    tenant = unique_tenant()
    counting = CountingReads(history)
    chunks = trace_chunks(BUSES, tenant)
    processor = ActivityProcessor(store=counting)  # type: ignore[arg-type]

    await run(processor, history, chunks)

    batches_with_newcomers = 0
    held: set = set()
    for chunk in chunks:
        devices = set(chunk.device.tolist())
        batches_with_newcomers += bool(devices - held)
        held |= devices
    assert len(held) == 8
    assert counting.loads == batches_with_newcomers < len(chunks) // 4


class FailingRead(CountingReads):
    """A store whose second read of fixes fails, as a database going away."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.reads = 0

    async def fixes_since(self, tenant, since_ms):
        self.reads += 1
        if self.reads == 2:
            raise StorageUnavailable("gone for a moment")
        return await self.store.fixes_since(tenant, since_ms)


async def test_a_failed_restore_is_done_whole_on_the_retry(history, monkeypatch):
    monkeypatch.setattr(processor_module, "RESTORE_DEVICES", 1)  # a read per device
    tenant = unique_tenant()
    chunks = trace_chunks(BUSES, tenant)
    cut = len(chunks) // 2
    rest = FixBatch.concat(chunks[cut:]).sorted_by_device_time()  # every device
    reference = ActivityProcessor()
    await run(reference, None, [*chunks[:cut], rest])
    before = ActivityProcessor(store=history)
    await run(before, history, chunks[:cut])
    await before.save_checkpoints()
    await history.store(rest)

    after = ActivityProcessor(store=FailingRead(history))  # type: ignore[arg-type]
    with pytest.raises(StorageUnavailable):
        await after.process(rest)
    await after.process(rest)  # the pipeline's retry

    for device in np.unique(rest.device.astype(str)).tolist():
        got, want = after.state(tenant, device), reference.state(tenant, device)
        assert got.odometer_m == pytest.approx(want.odometer_m, abs=1.0), device


async def test_a_round_saves_in_pieces_and_a_failed_piece_waits_for_the_next(
    history, monkeypatch
) -> None:
    """A round of 1,200 devices goes in writes of at most SAVE_PIECE_DEVICES; a
    write that fails leaves its devices and the later ones for the next round."""
    tenant = unique_tenant()
    count = 1_200
    fixes = FixBatch.from_columns(
        tenant,
        [f"car-{i:04d}" for i in range(count)],
        np.ones(count),
        np.full(count, time.time_ns() // 1_000_000 - 1_000),
        np.full(count, 45.0),
        np.full(count, 13.0),
    ).with_received(time.time_ns() // 1_000_000)
    processor = ActivityProcessor(store=history)
    await run(processor, history, [fixes])
    writes: list[int] = []
    failures = [2]  # the second write fails, once
    save = history.save_checkpoints

    async def failing_second(checkpoints) -> None:
        writes.append(len(checkpoints.devices))
        if failures and len(writes) == failures[0]:
            failures.clear()
            raise StorageUnavailable("down for one write")
        await save(checkpoints)

    monkeypatch.setattr(history, "save_checkpoints", failing_second)
    with pytest.raises(StorageUnavailable):
        await processor.save_checkpoints(pause_s=0.001)
    piece = processor_module.SAVE_PIECE_DEVICES
    assert writes == [piece, piece]
    writes.clear()

    left = count - piece  # the failed piece and after
    assert await processor.save_checkpoints() == left
    assert writes == [piece] * (left // piece) + [left % piece] * bool(left % piece)
    assert await processor.save_checkpoints() == 0
    saved = await history.load_checkpoints(tenant, fixes.device.tolist())
    assert sorted(saved.devices) == sorted(fixes.device.tolist())
