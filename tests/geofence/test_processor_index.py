"""The geofence processor's index: built off the event loop, whole."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.geofence.detector import FenceDetector
from tracking_grpc.geofence.index import CompiledFence, FenceIndex
from tracking_grpc.geofence.model import FenceSpec, ShapeSpec
from tracking_grpc.geofence.processor import INLINE_FIXES, GeofenceProcessor


class _Fences:
    """The two repository calls the processor makes to load an index."""

    def __init__(self, specs: list[FenceSpec]) -> None:
        self.specs = specs

    async def revision(self, tenant: str) -> int:
        return 1

    async def all(self, tenant: str) -> list[FenceSpec]:
        return self.specs


async def test_what_evaluation_needs_is_worked_out_while_the_index_is_built() -> None:
    """A huge fence's edge and size take seconds to work out; done lazily, the first
    fix near it (or a Check) paid for them on the event loop, stalling every stream.
    The index is built in a worker thread, so they must be worked out there."""
    road = FenceSpec("road", ShapeSpec.corridor([(0.0, 0.0), (0.0, 0.5)], 100.0))
    park = FenceSpec("park", ShapeSpec.circle(0.0, 1.0, 50.0))
    index = await GeofenceProcessor(_Fences([road, park])).index("t")
    corridor, circle = index.fences
    assert {"metric_boundary", "size_m"} <= corridor.__dict__.keys()
    assert "metric_boundary" not in circle.__dict__  # a circle needs neither


class _SlowFences(_Fences):
    """A repository whose revision and fence list are read while a fence is
    being written through the same process."""

    def __init__(self, specs: list[FenceSpec]) -> None:
        super().__init__(specs)
        self.revision_number = 1
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def revision(self, tenant: str) -> int:
        return self.revision_number

    async def all(self, tenant: str) -> list[FenceSpec]:
        specs = list(self.specs)  # what the read sees: written before it
        self.reading.set()
        await self.release.wait()
        return specs


def write_during_load(
    fences: _SlowFences, processor: GeofenceProcessor, spec: FenceSpec
) -> None:
    """A fence written through the processor's process, and its notice (during a
    load, when the test holds one at ``fences.reading``)."""
    fences.specs.append(spec)
    fences.revision_number += 1
    processor.changed("t")


async def test_a_fence_written_while_the_index_loads_is_in_the_next_index() -> None:
    """A fence created through this process while its index was loading (the load
    had read the revision before the write) was ignored until ``refresh_s`` later:
    a fix inside it in the meantime raised no ENTER."""
    park = FenceSpec("park", ShapeSpec.circle(0.0, 1.0, 50.0))
    depot = FenceSpec("depot", ShapeSpec.circle(0.0, 2.0, 50.0))
    fences = _SlowFences([park])
    processor = GeofenceProcessor(fences, refresh_s=3600.0)
    loading = asyncio.create_task(processor.index("t"))
    await fences.reading.wait()
    write_during_load(fences, processor, depot)
    fences.release.set()
    assert (await loading).ids.tolist() == ["park"]
    fences.reading.clear()
    assert sorted((await processor.index("t")).ids.tolist()) == ["depot", "park"]


def _counting_builds(processor: GeofenceProcessor) -> list[str]:
    built: list[str] = []
    build = processor._build

    def counted(tenant, specs):
        built.append(tenant)
        return build(tenant, specs)

    processor._build = counted  # type: ignore[method-assign]
    return built


async def test_callers_arriving_during_a_load_share_it() -> None:
    """Two builds of one tenant's index ran at once when a batch and a
    TimeInFences call both found it stale; both prepared the same fences'
    geometry in two threads, and GEOS crashed the server (CI, a segfault)."""
    fences = _SlowFences([FenceSpec("park", ShapeSpec.circle(0.0, 1.0, 50.0))])
    processor = GeofenceProcessor(fences, refresh_s=3600.0)
    built = _counting_builds(processor)
    callers = [asyncio.create_task(processor.index("t")) for _ in range(4)]
    await fences.reading.wait()
    callers[0].cancel()  # a caller that gives up leaves the load to the others
    fences.release.set()
    indexes = await asyncio.gather(*callers[1:])
    assert callers[0].cancelled()
    assert built == ["t"]
    assert all(index is indexes[0] for index in indexes)


async def test_a_caller_that_wrote_a_fence_during_a_load_waits_for_the_next() -> None:
    park = FenceSpec("park", ShapeSpec.circle(0.0, 1.0, 50.0))
    depot = FenceSpec("depot", ShapeSpec.circle(0.0, 2.0, 50.0))
    fences = _SlowFences([park])
    processor = GeofenceProcessor(fences, refresh_s=3600.0)
    first = asyncio.create_task(processor.index("t"))
    await fences.reading.wait()
    write_during_load(fences, processor, depot)
    writer = asyncio.create_task(processor.index("t"))  # the one that wrote
    await asyncio.sleep(0)
    fences.release.set()
    assert (await first).ids.tolist() == ["park"]
    assert sorted((await writer).ids.tolist()) == ["depot", "park"]


async def test_a_rebuilt_index_shares_no_geometry_with_the_one_in_use() -> None:
    """A rebuild reuses unchanged fences, but tests its grid cells in a worker
    thread against geometry of its own: the index in use may be evaluating a
    batch with its prepared geometry in another thread at the same time."""
    park = FenceSpec("park", ShapeSpec.corridor([(0.0, 0.0), (0.0, 0.5)], 100.0))
    fences = _SlowFences([park])
    fences.release.set()
    processor = GeofenceProcessor(fences, refresh_s=3600.0)
    before = await processor.index("t")
    write_during_load(fences, processor, FenceSpec("depot", ShapeSpec.circle(0, 2, 50)))
    after = await processor.index("t")
    assert after.fences[0] is before.fences[0]  # compiled once
    assert after.area[0] is not before.area[0]
    assert after.core[0] is not before.core[0]
    assert after.area[0].equals_exact(before.area[0], 0.0)
    assert before.area[0] is not before.fences[0].shape.area


async def test_a_check_waits_for_a_batch_evaluated_in_a_worker_thread(
    monkeypatch,
) -> None:
    """Check and TimeInFences query the index on the event loop; a large batch is
    evaluated with it in a worker thread meanwhile, and a prepared geometry must
    not be used by two threads at once."""
    park = FenceSpec("park", ShapeSpec.circle(0.0, 1.0, 50.0))
    processor = GeofenceProcessor(_Fences([park]))
    entered, release = threading.Event(), threading.Event()
    evaluate = FenceDetector.evaluate

    def held(self, batch, index, now_ms):
        entered.set()
        release.wait(10)
        return evaluate(self, batch, index, now_ms)

    monkeypatch.setattr(FenceDetector, "evaluate", held)
    n = INLINE_FIXES + 1
    batch = FixBatch.from_columns(
        "t", ["d"] * n, range(1, n + 1), range(n), [0.0] * n, [1.0] * n
    )
    processing = asyncio.create_task(processor.process(batch))
    await asyncio.to_thread(entered.wait, 10)
    checking = asyncio.create_task(processor.check("t", 0.0, 1.0, 5.0))
    await asyncio.sleep(0.05)
    waited = not checking.done()
    release.set()
    events = await processing
    assert waited
    assert [c.fence_id for c in await checking] == ["park"]
    assert [e.fence_id for e in events] == ["park"]


def test_indexes_of_the_same_fences_build_in_several_threads_at_once() -> None:
    """Without geometry of their own, builds sharing compiled fences crashed the
    interpreter (a segfault in GEOS) within a few builds; this test then fails by
    taking pytest down."""
    specs = [
        FenceSpec(f"f{i}", ShapeSpec.circle(47.0 + i * 0.001, 8.0, 100.0))
        for i in range(200)
    ]
    compiled = [CompiledFence.of(s).warm() for s in specs]

    def build() -> list[int]:
        return [len(FenceIndex(compiled)) for _ in range(5)]

    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda _: build(), range(4)))
    assert sizes == [[200] * 5] * 4


class _Forgetting(FenceDetector):
    """A detector that calls ``then`` as a load forgets deleted fences: the last
    step of the load, before its task is done."""

    def __init__(self, tenant: str, then) -> None:
        super().__init__(tenant)
        self.then = then

    def forget_fences(self, fence_ids: list[str]) -> None:
        super().forget_fences(fence_ids)
        self.then()


def test_a_caller_arriving_as_a_load_ends_does_not_spin() -> None:
    """A Check cancelled while it waited for the index leaves the load to finish
    alone; a fence written during that load makes the loaded index stale at once.
    A call that started in the same turn of the event loop as the load's end (before
    the load's done callback removed it) found the finished load, saw that it
    predated its own write count and awaited it again, which returns at once:
    ``index`` looped forever without yielding, and the server hung at 100 % CPU."""
    park = FenceSpec("park", ShapeSpec.circle(0.0, 1.0, 50.0))
    depot = FenceSpec("depot", ShapeSpec.circle(0.0, 2.0, 50.0))
    result: list[list[str]] = []

    async def scenario() -> None:
        fences = _SlowFences([park, depot])
        fences.release.set()
        processor = GeofenceProcessor(fences, refresh_s=3600.0)
        await processor.index("t")
        late: list[asyncio.Task[FenceIndex]] = []
        processor._detectors["t"] = _Forgetting(
            "t", lambda: late.append(asyncio.create_task(processor.index("t")))
        )
        fences.specs.remove(depot)  # DeleteFence
        fences.revision_number = 2
        processor.changed("t")
        fences.reading.clear()
        fences.release.clear()
        check = asyncio.create_task(processor.index("t"))
        await fences.reading.wait()
        processor.changed("t")  # another write while the load reads
        check.cancel()  # its client went away
        fences.release.set()
        await asyncio.sleep(0.2)
        result.append(sorted((await late[0]).ids.tolist()))

    thread = threading.Thread(target=asyncio.run, args=(scenario(),), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the event loop is stuck in index()"
    assert result == [["park"]]


async def test_a_stored_fence_that_cannot_be_evaluated_leaves_the_others_working(
    caplog,
) -> None:
    """Create refuses an area of no size in metres, but a fence stored before that
    check must not take its tenant's other fences down: before, its index build
    failed, every Check answered INTERNAL and no event was raised at all."""
    speck = ShapeSpec.geojson(
        '{"type": "Polygon", "coordinates": [[[0.5, 0.5], [0.5000000001, 0.5], '
        "[0.5000000001, 0.5000000001], [0.5, 0.5]]]}"
    )
    park = FenceSpec("park", ShapeSpec.circle(0.0, 1.0, 50.0))
    processor = GeofenceProcessor(_Fences([FenceSpec("speck", speck), park]))
    batch = FixBatch.from_columns("t", ["d"], [1], [0], [0.0], [1.0])
    events = await processor.process(batch)
    assert [e.fence_id for e in events] == ["park"]
    assert [c.fence_id for c in await processor.check("t", 0.0, 1.0, 5.0)] == ["park"]
    assert "fence speck (version 0) cannot be evaluated" in caplog.text
