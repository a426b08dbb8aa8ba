"""Building fix batches for activity tests: field cases and synthetic tracks."""

from __future__ import annotations

import csv
from datetime import datetime

import numpy as np

from tracking_grpc.activity.processor import ActivityProcessor
from tracking_grpc.core.fixes import FixBatch

M_PER_DEG = 111_195.0


def parse_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def case_batch(case: dict, tenant: str = "t") -> FixBatch:
    """A field case's fixes in arrival order."""
    f = case["fixes"]
    return FixBatch.from_columns(
        tenant,
        [x["device"] for x in f],
        [x["seq"] for x in f],
        [parse_ms(x["ts"]) for x in f],
        [x["lat"] for x in f],
        [x["lon"] for x in f],
        accuracy_m=[x.get("accuracy_m", np.nan) for x in f],
        speed_mps=[x.get("speed_mps", np.nan) for x in f],
    )


def track(
    east_m: np.ndarray,
    north_m: np.ndarray,
    step_s: float = 1.0,
    *,
    device: str = "d",
    lat0: float = 47.0,
    lon0: float = 8.0,
    start_ms: int = 1_700_000_000_000,
    accuracy_m: float = 5.0,
    **columns,
) -> FixBatch:
    """A device moving through metre offsets from (lat0, lon0), one fix per step."""
    n = len(east_m)
    lat = lat0 + np.asarray(north_m) / M_PER_DEG
    lon = lon0 + np.asarray(east_m) / (M_PER_DEG * np.cos(np.deg2rad(lat0)))
    time_ms = start_ms + (np.arange(n) * step_s * 1000).astype(np.int64)
    return FixBatch.from_columns(
        "t",
        [device] * n,
        np.arange(1, n + 1),
        time_ms,
        lat,
        lon,
        accuracy_m=np.full(n, accuracy_m),
        **columns,
    )


def stream(batch: FixBatch, chunk: int = 1, processor=None):
    """Feed a batch to a processor chunk by chunk in fix-time order; all events."""
    processor = processor or ActivityProcessor()
    ordered = batch.take(np.argsort(batch.time_ms, kind="stable"))
    events = []
    for start in range(0, len(ordered), chunk):
        part = ordered.take(np.arange(start, min(start + chunk, len(ordered))))
        events += processor.apply(part.sorted_by_device_time(), created_ms=0)
    return processor, events


def kinds(events) -> list[str]:
    return [e.type.name for e in events]


def bus_trip_ids(path) -> dict[tuple[str, int], str]:
    """(vehicle, fix time ms) -> recorded trip id, from the bus CSV."""
    with open(path, newline="") as handle:
        return {
            (
                row["vehicle_id"],
                parse_ms(row["timestamp"].replace(" ", "T") + "Z"),
            ): row["trip_id"]
            for row in csv.DictReader(handle)
        }
