"""Persisted fixes per second: the store's write (one pipeline, staging loaded from
binary array parameters) against the same transaction with its staging loaded by
binary COPY (the write it replaced) and by batched INSERTs, on the same rows in one
run; and the cost per fix of the Redis live update and fan-out.

    .venv/bin/python bench/storage_bench.py [--fixes 200000] [--batch 5000]

Needs PostgreSQL with PostGIS and Redis on 127.0.0.1 (scripts/test_services.sh).
Creates and drops its own database; uses its own Redis key prefix. Prints a table
and writes bench/results/storage_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import redis.asyncio as aioredis
from commit_bench import CopyStagingStore

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.storage import schema
from tracking_grpc.storage.postgres import (
    ADVANCE_DEVICES,
    INSERT_NEW,
    STAGING_COLUMNS,
    PostgresHistoryStore,
)
from tracking_grpc.storage.redis_broker import RedisBroker
from tracking_grpc.storage.redis_live import RedisLiveStore

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
RESULTS = Path(__file__).parent / "results" / "storage_bench.json"

INSERT_ROW = """
INSERT INTO fixes (tenant, device, time_ms, seq, position, accuracy_m, altitude_m,
    speed_mps, heading_deg, battery_pct, provider, received_ms)
VALUES (%s, %s, %s, %s, ST_SetSRID(ST_MakePoint(%s, %s), 4326), %s, %s, %s, %s, %s,
    %s, %s)
ON CONFLICT DO NOTHING
"""

INSERT_ARRAYS = """
INSERT INTO fixes (tenant, device, time_ms, seq, position, accuracy_m, altitude_m,
    speed_mps, heading_deg, battery_pct, provider, received_ms)
SELECT %(tenant)s, d, t, s, ST_SetSRID(ST_MakePoint(x, y), 4326), a, NULL, v, NULL,
    NULL, 0, r
FROM unnest(%(device)s::text[], %(time)s::bigint[], %(seq)s::bigint[],
    %(lon)s::float8[], %(lat)s::float8[], %(acc)s::real[], %(speed)s::real[],
    %(received)s::bigint[]) AS u(d, t, s, x, y, a, v, r)
ON CONFLICT DO NOTHING
RETURNING time_ms
"""


def make_fixes(tenant: str, count: int, devices: int, start_ms: int) -> FixBatch:
    """Fixes of ``devices`` devices, one per second each, wandering near New York."""
    rng = np.random.default_rng(1)
    per_device = count // devices
    device = np.repeat([f"veh-{i:05d}" for i in range(devices)], per_device)
    step = np.tile(np.arange(per_device), devices)
    base = rng.uniform([40.5, -74.3], [40.9, -73.7], (devices, 2)).repeat(per_device, 0)
    walk = rng.normal(0, 1e-4, (len(step), 2)).cumsum(axis=0)
    return FixBatch.from_columns(
        tenant,
        device,
        step + 1,
        start_ms + step * 1000,
        base[:, 0] + walk[:, 0],
        base[:, 1] + walk[:, 1],
        accuracy_m=rng.uniform(3, 30, len(step)),
        speed_mps=rng.uniform(0, 20, len(step)),
        received_ms=start_ms + step * 1000 + 200,
    )


def batches(fixes: FixBatch, size: int) -> list[FixBatch]:
    """Slices in time order (every device advances together), as ingest sees them."""
    order = np.lexsort((fixes.device.astype(str), fixes.time_ms))
    ordered = fixes.take(order)
    return [
        ordered.take(np.arange(i, min(i + size, len(ordered))))
        for i in range(0, len(ordered), size)
    ]


class InsertStagingStore(PostgresHistoryStore):
    """The same transaction, its staging table loaded with batched INSERTs."""

    async def _write(self, conn, staged, params) -> list[tuple]:
        names = ", ".join(name for name, _ in STAGING_COLUMNS)
        marks = ", ".join(["%s"] * len(STAGING_COLUMNS))
        rows = list(zip(*(values.tolist() for values, _ in staged), strict=True))
        async with conn.transaction():
            async with conn.cursor() as cur:
                await cur.executemany(
                    f"INSERT INTO staging ({names}) VALUES ({marks})", rows
                )
            await conn.execute(ADVANCE_DEVICES, params)
            cur = await conn.execute(INSERT_NEW, params)
            return await cur.fetchall()


async def time_store(
    url: str, parts: list[FixBatch], kind=PostgresHistoryStore
) -> float:
    store = await kind.open(url, max_connections=2)
    started = time.perf_counter()
    for part in parts:
        await store.store(part)
    elapsed = time.perf_counter() - started
    await store.close()
    return elapsed


async def time_executemany(url: str, parts: list[FixBatch]) -> float:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        started = time.perf_counter()
        for part in parts:
            rows = list(
                zip(
                    [part.tenant] * len(part), part.device.tolist(),
                    part.time_ms.tolist(), part.seq.astype(np.int64).tolist(),
                    part.lon.tolist(), part.lat.tolist(),
                    part.accuracy_m.tolist(), [None] * len(part),
                    part.speed_mps.tolist(), [None] * len(part), [None] * len(part),
                    [0] * len(part), part.received_ms.tolist(),
                    strict=True,
                )
            )  # fmt: skip
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(INSERT_ROW, rows)
        return time.perf_counter() - started


async def time_unnest(url: str, parts: list[FixBatch]) -> float:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        started = time.perf_counter()
        for part in parts:
            params = {
                "tenant": part.tenant, "device": part.device.tolist(),
                "time": part.time_ms.tolist(), "seq": part.seq.tolist(),
                "lon": part.lon.tolist(), "lat": part.lat.tolist(),
                "acc": part.accuracy_m.tolist(), "speed": part.speed_mps.tolist(),
                "received": part.received_ms.tolist(),
            }  # fmt: skip
            async with conn.transaction():
                cur = await conn.execute(INSERT_ARRAYS, params)
                await cur.fetchall()
        return time.perf_counter() - started


async def time_redis(parts: list[FixBatch], prefix: str) -> dict[str, float]:
    live = await RedisLiveStore.open(REDIS_URL, prefix)
    broker = await RedisBroker.open(REDIS_URL, prefix)
    fixes = sum(len(p) for p in parts)
    started = time.perf_counter()
    for part in parts:
        await live.update(part)
    live_s = time.perf_counter() - started
    started = time.perf_counter()
    for part in parts:
        await broker.publish(part)
    publish_s = time.perf_counter() - started
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await client.delete(*keys)
    await asyncio.gather(client.aclose(), live.close(), broker.close())
    return {
        "live_update_us_per_fix": live_s / fixes * 1e6,
        "publish_us_per_fix": publish_s / fixes * 1e6,
    }


RUNS = {
    "store_pipelined_arrays": time_store,
    "store_copy_binary": lambda url, parts: time_store(url, parts, CopyStagingStore),
    "store_insert_executemany": lambda url, parts: time_store(
        url, parts, InsertStagingStore
    ),
    "plain_insert_unnest": time_unnest,
    "plain_insert_executemany": time_executemany,
}


def with_tenant(parts: list[FixBatch], tenant: str) -> list[FixBatch]:
    return [dataclasses.replace(p, tenant=tenant) for p in parts]


async def main(args: argparse.Namespace) -> dict:
    name = f"trk_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        await schema.migrate(url)
        start_ms = int(time.time() * 1000) // 86_400_000 * 86_400_000
        fixes = make_fixes("copy", args.fixes, args.devices, start_ms)
        parts = batches(fixes, args.batch)
        results = {}
        for method, run in RUNS.items():
            elapsed = await run(url, with_tenant(parts, method))
            results[method] = {"seconds": elapsed, "fixes_per_s": len(fixes) / elapsed}
        resend = await time_store(url, with_tenant(parts, "store_pipelined_arrays"))
        results["store_resend_all_duplicates"] = {
            "seconds": resend,
            "fixes_per_s": len(fixes) / resend,
        }
        with psycopg.connect(url) as conn:
            counts: dict[str, int] = dict(
                conn.execute(
                    "SELECT tenant, count(*) FROM fixes GROUP BY tenant"
                ).fetchall()
            )
        redis_costs = await time_redis(parts, f"trkbench-{uuid.uuid4().hex[:8]}:")
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return {
        "command": "python bench/storage_bench.py "
        + f"--fixes {args.fixes} --devices {args.devices} --batch {args.batch}",
        "machine": platform.platform(),
        "fixes": len(fixes),
        "batch": args.batch,
        "stored_counts": counts,
        "postgres": results,
        "redis": redis_costs,
    }


def report(result: dict) -> None:
    print(f"{result['fixes']} fixes in batches of {result['batch']}")
    print(f"{'method':<34}{'seconds':>10}{'fixes/s':>12}")
    for method, row in result["postgres"].items():
        print(f"{method:<34}{row['seconds']:>10.2f}{row['fixes_per_s']:>12,.0f}")
    for name, value in result["redis"].items():
        print(f"redis {name:<38}{value:>10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixes", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=5_000)
    outcome = asyncio.run(main(parser.parse_args()))
    report(outcome)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(outcome, indent=2) + "\n")
