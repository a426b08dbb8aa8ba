"""The geofence processor's index: built off the event loop, whole."""

from __future__ import annotations

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
