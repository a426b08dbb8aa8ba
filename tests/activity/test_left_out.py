"""A device the activity processor keeps failing on costs neither memory nor reads.

When the processor raises on a batch, the batch is tried again split by device
(``isolation``) and the failing device's fixes are left out. Each failing call
used to give a new device a slot it then left empty for good, and to drop the
devices it had restored from their checkpoints, to restore them again, reading
every fix stored since the checkpoint, at the device's next call: for a device
failing batch after batch, more each time. The store here is a real SQLite
history store; the fault is injected (the analysis raises for the armed devices),
since no input makes the processor raise today.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tracking_grpc import isolation
from tracking_grpc.activity import processor as processor_module
from tracking_grpc.activity.processor import ActivityProcessor
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import TrackingEvent
from tracking_grpc.storage.sqlite import SqliteHistoryStore

TENANT = "left-out"
DEVICES = [f"car-{i}" for i in range(6)]
BAD = "car-3"
FIXES = 10  # per device and batch, 5 s and 50 m apart, east along a parallel
BATCHES = 24  # after the restart
LAT, LON = 48.2, 16.37
M_PER_DEG_LON = 111_195.0 * np.cos(np.radians(LAT))


class CountingRows:
    """A store that counts the fixes restores read through it."""

    def __init__(self, store) -> None:
        self.store, self.rows = store, 0

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    async def fixes_since(self, tenant, since_ms):
        fixes = await self.store.fixes_since(tenant, since_ms)
        self.rows += len(fixes)
        return fixes


def batch(k: int, devices: list[str], start_ms: int) -> FixBatch:
    """The k-th batch of ``devices``, received now (none looks offline)."""
    i = k * FIXES + np.arange(FIXES)
    n = len(devices)
    # Each device a millisecond and 1.1 km apart from the one before it.
    place = [DEVICES.index(d) if d in DEVICES else len(DEVICES) for d in devices]
    offset = np.repeat(np.array(place), FIXES)
    fixes = FixBatch.from_columns(
        TENANT,
        np.repeat(np.array(devices, dtype=object), FIXES),
        np.tile(i + 1, n),
        np.tile(start_ms + 5_000 * i, n) + offset,
        LAT + 0.01 * offset,
        np.tile(LON + 50.0 * i / M_PER_DEG_LON, n),
        accuracy_m=np.full(n * FIXES, 5.0),
    )
    return fixes.with_received(time.time_ns() // 1_000_000)


async def events_of(processor: ActivityProcessor, fixes: FixBatch) -> list:
    """As the ingest pipeline does: the batch, and by device when it raises."""
    try:
        return await processor.process(fixes)
    except RuntimeError as exc:
        return await isolation.by_device("activity", fixes, processor.process, exc)


async def test_a_device_failing_batch_after_batch_is_not_read_again(
    tmp_path, monkeypatch
) -> None:
    history = await SqliteHistoryStore.open(tmp_path / "history.sqlite3")
    try:
        start_ms = time.time_ns() // 1_000_000 - 3_600_000
        # Before the restart: a checkpoint after two batches, then one more
        # applied (a crash): the restore replays it.
        before = ActivityProcessor(store=history)
        reference = ActivityProcessor()
        good = [d for d in DEVICES if d != BAD]
        for k in range(3):
            if k == 2:
                await before.save_checkpoints()
            fixes = batch(k, DEVICES, start_ms)
            await history.store(fixes)
            await before.process(fixes)
            reference.apply(batch(k, good, start_ms), 0)

        original = processor_module.analyse

        def failing(fixes: FixBatch, *args) -> object:
            devices = np.unique(fixes.device.astype(str)).tolist()
            if BAD in devices or any(d.startswith("new-") for d in devices):
                raise RuntimeError("injected fault")
            return original(fixes, *args)

        monkeypatch.setattr(processor_module, "analyse", failing)
        counting = CountingRows(history)
        after = ActivityProcessor(store=counting)  # type: ignore[arg-type]
        read: list[int] = []
        events: list[TrackingEvent] = []
        for k in range(3, 3 + BATCHES):
            # Every batch also brings a device never seen, which fails too.
            fixes = batch(k, [*DEVICES, f"new-{k}"], start_ms)
            await history.store(fixes)
            rows = counting.rows
            events += await events_of(after, fixes)
            read.append(counting.rows - rows)
            reference.apply(batch(k, good, start_ms), 0)
    finally:
        await history.close()

    # The restart read each device's fixes since its checkpoint's tail once
    # (not once per call of the retries); the failing device was not read again,
    # batch after batch.
    assert 0 < read[0] <= 4 * FIXES * len(DEVICES)  # all they have stored
    assert read[1:] == [0] * (BATCHES - 1)
    # Its slot is kept; the new devices' slots were emptied and given again.
    state = after._tenants[TENANT]
    assert len(state.names) <= len(DEVICES) + 1
    assert state.cols["last_ms"].size <= 64 and state.kalman.size <= 64
    assert not any(d.startswith("new-") for d in state.slots)
    # The other devices applied the replay in the retry of the failed call.
    for device in good:
        got, want = after.state(TENANT, device), reference.state(TENANT, device)
        assert got is not None and want is not None
        assert got.time_ms == want.time_ms, device
        assert got.odometer_m == pytest.approx(want.odometer_m, abs=1.0), device
    assert BAD not in {e.device for e in events}
    left = after.state(TENANT, BAD)
    assert left is not None and left.time_ms < start_ms + 5_000 * 2 * FIXES
