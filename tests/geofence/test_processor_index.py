"""The geofence processor's index: built off the event loop, whole."""

from __future__ import annotations

import asyncio

from tracking_grpc.geofence.model import FenceSpec, ShapeSpec
from tracking_grpc.geofence.processor import GeofenceProcessor


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
    fences.specs.append(depot)  # the write, and its notice, during the load
    fences.revision_number = 2
    processor.changed("t")
    fences.release.set()
    assert (await loading).ids.tolist() == ["park"]
    fences.reading.clear()
    assert sorted((await processor.index("t")).ids.tolist()) == ["depot", "park"]
