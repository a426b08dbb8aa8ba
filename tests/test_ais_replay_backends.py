"""The AIS hour of New York Harbor (295 vessels, 8,689 fixes) through the production
backends, in arrival order and in batches as ingest would store them, twice."""

from __future__ import annotations

import csv
from datetime import UTC, datetime

import numpy as np
import pytest

from tests.backends import unique_tenant
from tests.conftest import TRACES, require_shared
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.storage.postgres import PostgresHistoryStore
from tracking_grpc.storage.redis_keys import distance_m
from tracking_grpc.storage.redis_live import RedisLiveStore

AIS = TRACES / "nyharbor_ais_2020-06-30_first_hour.csv"
FIXES, VESSELS, REPEATED_TIMES = 8_689, 295, 2


def load_ais(tenant: str) -> FixBatch:
    """Every row, seq = the vessel's arrival order, speed converted from knots."""
    with require_shared(AIS).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    device = np.array([r["MMSI"] for r in rows], dtype=object)
    stamps = [
        datetime.fromisoformat(r["BaseDateTime"]).replace(tzinfo=UTC) for r in rows
    ]
    order = np.argsort(device.astype(str), kind="stable")
    seq = np.empty(len(rows), dtype=np.uint64)
    first = np.r_[True, device[order][1:] != device[order][:-1]]
    run_start = np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0))
    seq[order] = np.arange(len(rows)) - run_start + 1
    return FixBatch.from_columns(
        tenant, device, seq,
        [int(s.timestamp() * 1000) for s in stamps],
        [float(r["LAT"]) for r in rows], [float(r["LON"]) for r in rows],
        speed_mps=[float(r["SOG"]) * 0.514444 for r in rows],
    )  # fmt: skip


def in_batches(batch: FixBatch, size: int) -> list[FixBatch]:
    return [
        batch.take(np.arange(i, min(i + size, len(batch))))
        for i in range(0, len(batch), size)
    ]


@pytest.mark.slow
async def test_ais_hour_is_stored_once_and_live_state_is_newest(
    pg_url, redis_url, redis_prefix
):
    tenant = unique_tenant()
    fixes = load_ais(tenant)
    history = await PostgresHistoryStore.open(pg_url)
    live = await RedisLiveStore.open(redis_url, redis_prefix)
    new = np.concatenate([await history.store(b) for b in in_batches(fixes, 500)])
    for part in in_batches(fixes.take(new), 500):
        await live.update(part)
    again = np.concatenate([await history.store(b) for b in in_batches(fixes, 2000)])

    assert (new.sum(), again.sum()) == (FIXES - REPEATED_TIMES, 0)
    assert await history.count(tenant) == FIXES - REPEATED_TIMES
    snapshot = await live.snapshot(tenant)
    assert len(snapshot) == VESSELS
    newest = fixes.take(fixes.newest_per_device())
    by_device = dict(zip(newest.device, newest.time_ms.tolist(), strict=True))
    assert (
        dict(zip(snapshot.device, snapshot.time_ms.tolist(), strict=True)) == by_device
    )
    await history.close()
    await live.close()


@pytest.mark.slow
async def test_ais_nearby_matches_brute_force(redis_url, redis_prefix) -> None:
    tenant = unique_tenant()
    fixes = load_ais(tenant)
    live = await RedisLiveStore.open(redis_url, redis_prefix)
    await live.update(fixes)
    newest = fixes.take(fixes.newest_per_device())
    for lat, lon, radius_m in [(40.70, -74.02, 3_000.0), (40.64, -74.07, 800.0)]:
        found, _ = await live.nearby(tenant, lat, lon, radius_m, limit=1000)
        expected = distance_m(lat, lon, newest.lat, newest.lon) <= radius_m
        assert expected.sum() >= 5
        assert sorted(found.device) == sorted(newest.device[expected])
    await live.close()
