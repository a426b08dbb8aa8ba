"""History queries: load a device's fixes for a time range and analyse them.

Reads go through :meth:`HistoryStore.history`, so they work on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tracking_grpc.activity import segments
from tracking_grpc.activity.params import ActivityConfig, ActivityParams
from tracking_grpc.activity.track import Analysis, analyse
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.core.precision import coarsen, snap
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.storage.base import HistoryStore
from tracking_grpc.timestamps import LATEST_MS

MAX_RANGE_MS = 366 * 86_400_000
MAX_QUERY_FIXES = 2_000_000


def check_range(start_ms: int, end_ms: int) -> None:
    if start_ms < 0:
        raise InvalidArgument("start_ms", "must be >= 0")
    if end_ms <= start_ms:
        raise InvalidArgument("end_ms", "must be after start_ms")
    if end_ms > LATEST_MS:
        raise InvalidArgument("end_ms", f"must be at most {LATEST_MS} (9999-01-01)")
    if end_ms - start_ms > MAX_RANGE_MS:
        raise InvalidArgument("end_ms", "range longer than 366 days")


@dataclass(frozen=True, slots=True)
class DeviceHistory:
    fixes: FixBatch
    analysis: Analysis
    params: ActivityParams

    def trips(self) -> list[segments.Trip]:
        return segments.trips(self.analysis, self.params)

    def stops(self) -> list[segments.Stop]:
        return segments.stops(self.analysis)


async def load(
    history: HistoryStore,
    config: ActivityConfig,
    tenant: str,
    device: str,
    start_ms: int,
    end_ms: int,
    precision_m: float = 0.0,
) -> DeviceHistory:
    """A device's fixes in [start_ms, end_ms), analysed with the tenant's rules;
    coarsened first for a caller limited to ``precision_m``, so that nothing
    derived from them (trips, stops, places, heatmaps) is finer than the grid."""
    check_range(start_ms, end_ms)
    fixes = await history.history(
        tenant, device, start_ms, end_ms, limit=MAX_QUERY_FIXES + 1
    )
    if len(fixes) > MAX_QUERY_FIXES:
        raise InvalidArgument(
            "end_ms", f"range holds more than {MAX_QUERY_FIXES} fixes; ask for less"
        )
    params = config.params(tenant)
    fixes = fixes.sorted_by_device_time()
    if precision_m > 0 and len(fixes):
        _, _, bound_m = snap(fixes.lat, fixes.lon, precision_m)
        params = on_grid(params, float(bound_m.max()))
        fixes = coarsen(fixes, precision_m)
    return DeviceHistory(fixes, analyse(fixes, params, complete=True), params)


def on_grid(params: ActivityParams, bound_m: float) -> ActivityParams:
    """The rules for fixes snapped to cells whose centres lie at most ``bound_m``
    from any point of them: a coarse fix's accuracy is widened by that much, and
    two coarse fixes may lie up to twice that further apart than the fixes.
    Without the allowance a coarse track is all jumps and untrusted fixes, with no
    trips or stops. (Stops keep their radius: a wider one would make a slow
    vehicle crossing a large cell stop.)"""
    return replace(
        params,
        max_accuracy_m=params.max_accuracy_m + bound_m,
        jump_slack_m=params.jump_slack_m + 2 * bound_m,
    )
