"""CPU per fix of each stage a gateway batch passes after validation, in-process:
the PostgreSQL store (client and backend CPU), the Redis live update (client CPU
and the scripts' time in Redis) and the broker publish; against, in the same run, a
plain INSERT of the same rows into a table with the same indexes (the floor: what the
store's duplicate rules and device state add on top).

    .venv/bin/python bench/gateway_stages.py [--batch 5000] [--devices 50000]

Batches carry one fix per device, the next ``--batch`` devices each time, as the load
tool's gateways do; every fix moves its device a little. Needs PostgreSQL with PostGIS
and Redis on 127.0.0.1; creates and drops its own database and Redis key prefix.
PostgreSQL CPU is that of the backends connected to the private database; Redis time
comes from ``INFO commandstats`` (scripts of everyone using that Redis: an upper
bound). Prints a table and writes bench/results/gateway_stages.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import redis

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.loadgen import procstat
from tracking_grpc.storage import schema
from tracking_grpc.storage.postgres import PostgresHistoryStore
from tracking_grpc.storage.redis_broker import RedisBroker
from tracking_grpc.storage.redis_live import RedisLiveStore

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
RESULTS = Path(__file__).parent / "results" / "gateway_stages.json"
WARM_UP = 4  # batches before measuring (devices created, caches filled)

PLAIN_TABLE = """
CREATE TABLE plain (LIKE fixes INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE plain ADD PRIMARY KEY (tenant, device, time_ms);
CREATE INDEX ON plain (tenant, device, seq);
CREATE INDEX ON plain USING spgist (position);
CREATE INDEX ON plain USING brin (time_ms);
"""
PLAIN_INSERT = """
INSERT INTO plain (tenant, device, time_ms, seq, position, provider, received_ms)
SELECT 't', d, t, s, ST_SetSRID(ST_MakePoint(x, y), 4326), 1, t
FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::float8[], %s::float8[])
    AS u(d, t, s, x, y)
"""


def gateway_batch(k: int, size: int, devices: int, start_ms: int) -> FixBatch:
    """Batch ``k``: the next ``size`` devices, one fix each, near London."""
    rng = np.random.default_rng(k)
    rows = (k * size + np.arange(size)) % devices
    return FixBatch.from_columns(
        "t",
        np.array([f"gw-{i:07d}" for i in rows], dtype=object),
        np.full(size, k * size // devices + 1, dtype=np.uint64),
        np.full(size, start_ms + k, dtype=np.int64),
        51.5 + rng.uniform(-0.1, 0.1, size),
        -0.12 + rng.uniform(-0.1, 0.1, size),
        provider=np.ones(size, np.int8),
        received_ms=start_ms + k,
    )


class PostgresCpu:
    """CPU seconds of the backends serving one database (its connections)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)

    def __call__(self) -> float:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        ).fetchall()
        return sum(procstat.cpu_by_pid([pid for (pid,) in rows]).values())


def redis_script_s(client: redis.Redis) -> float:
    stats = client.info("commandstats")
    return sum(v["usec"] for k, v in stats.items() if k.startswith("cmdstat_eval"))


class Meter:
    """Client CPU, wall time and a backend's CPU summed over measured calls."""

    def __init__(self, backend, batch: int) -> None:
        self.backend = backend
        self.batch = batch
        self.client_s = self.wall_s = self.backend_s = 0.0
        self.fixes = 0

    async def run(self, call, fixes: int, measured: bool):
        wall, cpu, other = time.perf_counter(), time.process_time(), self.backend()
        result = await call
        if measured:
            self.wall_s += time.perf_counter() - wall
            self.client_s += time.process_time() - cpu
            self.backend_s += self.backend() - other
            self.fixes += fixes
        return result

    def row(self) -> dict[str, float]:
        per = 1e6 / max(self.fixes, 1)
        return {
            "client_us_per_fix": round(self.client_s * per, 2),
            "backend_us_per_fix": round(self.backend_s * per, 2),
            "wall_ms_per_batch": round(self.wall_s * per * self.batch / 1e3, 1),
        }


async def plain_insert(conn: psycopg.AsyncConnection, batch: FixBatch) -> None:
    async with conn.transaction():
        await conn.execute(
            PLAIN_INSERT,
            [
                batch.device.tolist(),
                batch.time_ms.tolist(),
                batch.seq.astype(np.int64).tolist(),
                batch.lon.tolist(),
                batch.lat.tolist(),
            ],
        )


async def measure(url: str, args: argparse.Namespace) -> dict[str, dict]:
    prefix = f"trkstages{uuid.uuid4().hex[:8]}:"
    counter = redis.Redis.from_url(REDIS_URL)
    store = await PostgresHistoryStore.open(url)
    plain = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await plain.execute("SET jit = off")
    live = await RedisLiveStore.open(REDIS_URL, prefix)
    broker = await RedisBroker.open(REDIS_URL, prefix)
    postgres_cpu = PostgresCpu(url)
    meters = {
        "postgres_store": Meter(postgres_cpu, args.batch),
        "postgres_plain_insert": Meter(postgres_cpu, args.batch),
        "redis_live_update": Meter(lambda: redis_script_s(counter) / 1e6, args.batch),
        "redis_publish": Meter(lambda: 0.0, args.batch),
    }
    start_ms = int(time.time() * 1000) - 600_000
    try:
        for k in range(args.batches):
            batch = gateway_batch(k, args.batch, args.devices, start_ms)
            measured = k >= WARM_UP
            new = await meters["postgres_store"].run(
                store.store(batch), len(batch), measured
            )
            if not new.all():
                raise RuntimeError("a fresh fix was not stored")
            await meters["postgres_plain_insert"].run(
                plain_insert(plain, batch), len(batch), measured
            )
            moved = await meters["redis_live_update"].run(
                live.update(batch), len(batch), measured
            )
            await meters["redis_publish"].run(
                broker.publish(moved), len(batch), measured
            )
    finally:
        await asyncio.gather(store.close(), live.close(), broker.close(), plain.close())
        keys = list(counter.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            counter.delete(*keys[i : i + 1000])
        counter.close()
        postgres_cpu.conn.close()
    return {name: meter.row() for name, meter in meters.items()}


async def main(args: argparse.Namespace) -> dict:
    name = f"trk_stages_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        await schema.migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(PLAIN_TABLE)
        stages = await measure(url, args)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return {
        "command": "python bench/gateway_stages.py "
        + f"--batch {args.batch} --devices {args.devices} --batches {args.batches}",
        "machine": platform.platform(),
        "fixes_measured_per_stage": args.batch * (args.batches - WARM_UP),
        "stages": stages,
    }


def report(result: dict) -> None:
    print(result["command"])
    print(f"{'stage':<24}{'client µs/fix':>15}{'backend µs/fix':>16}{'ms/batch':>10}")
    for stage, row in result["stages"].items():
        print(
            f"{stage:<24}{row['client_us_per_fix']:>15.2f}"
            f"{row['backend_us_per_fix']:>16.2f}{row['wall_ms_per_batch']:>10.1f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--devices", type=int, default=50_000)
    parser.add_argument("--batches", type=int, default=24)
    outcome = asyncio.run(main(parser.parse_args()))
    report(outcome)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(outcome, indent=2) + "\n")
