"""The assignment keeper against a store that fails: a failed load, a failed
assignment and a stop in the middle of a checkpoint round."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from tests.routes import support
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import StorageUnavailable, Unavailable
from tracking_grpc.routing.assignments import SAVE_PIECE, AssignmentKeeper
from tracking_grpc.routing.monitor import PlannedRoute, RouteMonitor
from tracking_grpc.storage.base import RouteCheckpoint, StoredRoute

HANG_S = 30  # a hang guard, not a timing
TENANT = "t1"
KEPT_IN_MEMORY = "arrived routes kept in memory"


def planned(device: str, route_id: str = "r1") -> PlannedRoute:
    """A straight 1.1 km route north."""
    lat, lon = np.array([60.16, 60.17]), np.array([24.93, 24.93])
    return PlannedRoute(
        TENANT, device, route_id, lat, lon, np.array([110.0]), support.START_MS
    )


class RouteStore:
    """The route calls of a history store, in memory; ``blocked`` pieces of
    checkpoints (by their number from 0) wait until the test is over."""

    def __init__(self) -> None:
        self.stored: dict[str, StoredRoute] = {}
        self.saved: dict[str, RouteCheckpoint] = {}
        self.fail_assign = False
        self.fail_load: Exception | None = None
        self.blocked: set[int] = set()
        self.entered = asyncio.Event()  # a blocked piece is being written
        self.pieces = 0

    async def monitored_routes(
        self, after: tuple[str, str] | None = None, limit: int | None = None
    ) -> list[StoredRoute]:
        if self.fail_load is not None:
            raise self.fail_load
        ordered = sorted(self.stored.values(), key=lambda r: r.checkpoint.device)
        keys = [(r.checkpoint.tenant, r.checkpoint.device) for r in ordered]
        found = [
            r for r, key in zip(ordered, keys, strict=True) if key > (after or ("", ""))
        ]
        return found[:limit]

    async def assign_route(self, route: StoredRoute) -> None:
        if self.fail_assign:
            raise StorageUnavailable("the store is down")
        self.stored[route.checkpoint.device] = route

    async def routes(self, tenant: str, devices: Sequence[str]) -> list[StoredRoute]:
        return [self.stored[d] for d in devices if d in self.stored]

    async def save_route_checkpoints(
        self, checkpoints: Sequence[RouteCheckpoint]
    ) -> None:
        number, self.pieces = self.pieces, self.pieces + 1
        if number in self.blocked:
            self.entered.set()
            await asyncio.Event().wait()
        self.saved.update({c.device: c for c in checkpoints})


async def started(store: RouteStore, load_wait_s: float = 5.0) -> AssignmentKeeper:
    """A keeper on ``store`` whose rounds do not come during a test."""
    keeper = AssignmentKeeper(RouteMonitor(), store, 3600.0, load_wait_s)
    keeper.start()
    return keeper


async def test_a_failed_load_monitors_nothing_and_holds_up_no_fix() -> None:
    store = RouteStore()
    store.fail_load = RuntimeError("a bug in the load")
    keeper = await started(store)
    drive = support.fixes("van-1", np.array([[60.16, 24.93], [60.17, 24.93]]))
    async with asyncio.timeout(HANG_S):
        assert await keeper.process(drive) == []
        await keeper.assign(planned("van-1"))
        events = await keeper.process(drive)
        await keeper.stop()
    assert [e.type.name for e in events] == ["ARRIVED"]


async def test_calls_do_not_wait_for_ever_for_the_load() -> None:
    store = RouteStore()
    store.fail_load = StorageUnavailable("the store is down")  # retried
    keeper = await started(store, load_wait_s=0.1)
    async with asyncio.timeout(HANG_S):
        with pytest.raises(Unavailable):
            await keeper.assign(planned("van-1"))
        with pytest.raises(Unavailable):
            await keeper.progress(TENANT, "van-1")
        await keeper.stop()


async def test_a_failed_assignment_keeps_the_previous_route() -> None:
    store = RouteStore()
    keeper = await started(store)
    await keeper.assign(planned("van-1", "first"))
    store.fail_assign = True
    with pytest.raises(Unavailable):
        await keeper.assign(planned("van-1", "second"))
    monitored = keeper.monitor.route(TENANT, "van-1")
    assert monitored is not None and monitored.route_id == "first"
    progress = await keeper.progress(TENANT, "van-1")
    assert progress is not None and progress.route_id == "first"
    assert store.stored["van-1"].checkpoint.route_id == "first"
    await keeper.stop()


async def test_a_stop_during_a_checkpoint_round_saves_every_route() -> None:
    store = RouteStore()
    store.blocked = {1}  # the first round's second piece never ends
    monitor = RouteMonitor()
    devices = [f"van-{i}" for i in range(SAVE_PIECE + 50)]
    for device in devices:  # changed since their last checkpoint
        monitor.assign(planned(device))
    monitor.mark_changed([(TENANT, d) for d in devices])
    keeper = AssignmentKeeper(monitor, store, 0.0)
    keeper.start()
    async with asyncio.timeout(HANG_S):
        await store.entered.wait()
        await keeper.stop()  # cancels the round, then saves what changed
    assert sorted(store.saved) == sorted(devices)


async def test_retention_forgets_routes_that_arrived_before_the_cutoff() -> None:
    keeper = await started(RouteStore())
    for device in ("van-1", "van-2"):
        await keeper.assign(planned(device))
    drive = support.fixes("van-1", np.array([[60.16, 24.93], [60.17, 24.93]]))
    assert [e.type.name for e in await keeper.process(drive)] == ["ARRIVED"]
    await keeper.stop()  # the arrival saved
    arrived_ms = support.START_MS + 5_000

    assert await keeper.forget_arrived(arrived_ms) == {KEPT_IN_MEMORY: 0}
    assert await keeper.forget_arrived(arrived_ms + 1) == {KEPT_IN_MEMORY: 1}
    assert keeper.monitor.route(TENANT, "van-1") is None
    assert keeper.monitor.route(TENANT, "van-2") is not None  # not arrived


def test_a_route_coming_between_unheld_and_evaluate_is_used() -> None:
    """The monitor reuses a batch's route slots from ``unheld`` in ``evaluate``
    only while no route came or went."""
    monitor = RouteMonitor()
    monitor.assign(planned("van-1"))
    lat = np.array([60.16, 60.17, 60.16, 60.165, 60.17])
    batch = FixBatch.from_columns(
        TENANT,
        ["van-1"] * 2 + ["van-2"] * 3,
        np.array([1, 2, 1, 2, 3]),
        support.START_MS + np.array([0, 5_000, 0, 5_000, 10_000]),
        lat,
        np.full(5, 24.93),
        accuracy_m=np.full(5, 5.0),
    )
    assert monitor.unheld(batch) == ["van-1"]
    monitor.assign(planned("van-2"))  # while the take-over reads the store
    monitor.clear(TENANT, "van-1")
    events = monitor.evaluate(batch, support.START_MS)
    arrived = [(e.device, e.fix_seq) for e in events if e.type.name == "ARRIVED"]
    assert arrived == [("van-2", 3)]
