"""What one group commit costs on PostgreSQL: the store's write (three statements
in one pipeline, rows as binary array parameters) against the write it replaced
(a checked checkout, then BEGIN, COPY into staging, the two statements and COMMIT,
each a round trip of its own), alternating on the same database.

    .venv/bin/python bench/commit_bench.py [--sizes 1 20 200 5000] [--rounds 4]

A commit of size N carries one fix each of N devices drawn from a fleet of 10,000,
every fix the device's next, as device streams produce them. Per commit: wall time
(one commit at a time, nothing else running in this process), the client's CPU and
the CPU of the PostgreSQL backends serving the bench's own database. Needs
PostgreSQL with PostGIS on 127.0.0.1; creates and drops its own database. Prints a
table and writes bench/results/commit_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import psycopg

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.loadgen import procstat
from tracking_grpc.storage import pgcopy, schema
from tracking_grpc.storage.postgres import (
    ADVANCE_DEVICES,
    INSERT_NEW,
    STAGING_COLUMNS,
    PostgresHistoryStore,
)

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS = Path(__file__).parent / "results" / "commit_bench.json"
FLEET = 10_000
COPY_STAGING = "COPY staging ({}) FROM STDIN (FORMAT BINARY)".format(
    ", ".join(name for name, _ in STAGING_COLUMNS)
)


class CopyStagingStore(PostgresHistoryStore):
    """The write as it was: the pool's checkout check (an empty query), then an
    explicit transaction with a binary COPY into staging and the same two
    statements; every step waits for its answer."""

    async def _write(self, conn, staged, params) -> list[tuple]:
        await conn.execute("")
        async with conn.transaction():
            async with conn.cursor().copy(COPY_STAGING) as copy:
                await copy.write(pgcopy.encode_rows(staged))
            await conn.execute(ADVANCE_DEVICES, params)
            cur = await conn.execute(INSERT_NEW, params)
            return await cur.fetchall()


class Fleet:
    """Devices that each send their next fix; one commit draws ``size`` of them."""

    def __init__(self, tenant: str, start_ms: int) -> None:
        self.tenant = tenant
        self.start_ms = start_ms
        self.seq = np.zeros(FLEET, dtype=np.uint64)
        self.rng = np.random.default_rng(7)
        self.names = np.array([f"dev-{i:05d}" for i in range(FLEET)], dtype=object)

    def commit(self, size: int) -> FixBatch:
        devices = self.rng.choice(FLEET, size, replace=False)
        self.seq[devices] += 1
        seq = self.seq[devices]
        return FixBatch.from_columns(
            self.tenant,
            self.names[devices],
            seq,
            self.start_ms + seq.astype(np.int64) * 5_000,
            51.5 + self.rng.uniform(-0.1, 0.1, size),
            -0.12 + self.rng.uniform(-0.1, 0.1, size),
            accuracy_m=self.rng.uniform(3, 30, size),
            provider=np.ones(size, np.int8),
            received_ms=self.start_ms,
        )


class BackendCpu:
    """CPU seconds of the backends connected to one database (but this one)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)

    def __call__(self) -> float:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        ).fetchall()
        return sum(procstat.cpu_by_pid([pid for (pid,) in rows]).values())


async def run_round(
    store: PostgresHistoryStore, fleet: Fleet, size: int, commits: int, cpu: BackendCpu
) -> np.ndarray:
    """Wall, client CPU and backend CPU seconds summed over ``commits`` commits."""
    batches = [fleet.commit(size) for _ in range(commits)]
    wall, client, backend = time.perf_counter(), time.process_time(), cpu()
    for batch in batches:
        if not (await store.store(batch)).all():
            raise RuntimeError("a new fix was not stored")
    return np.array(
        [
            time.perf_counter() - wall,
            time.process_time() - client,
            cpu() - backend,
        ]
    )


async def measure(url: str, args: argparse.Namespace) -> dict[str, dict]:
    start_ms = int(time.time() * 1000) - 3_600_000
    kinds = {"pipelined": PostgresHistoryStore, "copy_round_trips": CopyStagingStore}
    stores = {name: await kind.open(url) for name, kind in kinds.items()}
    fleets = {name: Fleet(f"bench-{name}", start_ms) for name in kinds}
    cpu = BackendCpu(url)
    results: dict[str, dict] = {}
    try:
        for size in args.sizes:
            commits = max(4, min(200, 4000 // size))
            totals = {name: np.zeros(3) for name in kinds}
            for name in kinds:  # warm up: devices created, statements prepared
                await run_round(stores[name], fleets[name], size, 10, cpu)
            for _ in range(args.rounds):
                for name in kinds:
                    totals[name] += await run_round(
                        stores[name], fleets[name], size, commits, cpu
                    )
            n = commits * args.rounds
            results[str(size)] = {
                name: {
                    "wall_ms": round(total[0] / n * 1e3, 3),
                    "client_cpu_ms": round(total[1] / n * 1e3, 3),
                    "postgres_cpu_ms": round(total[2] / n * 1e3, 3),
                    "commits": n,
                }
                for name, total in totals.items()
            }
    finally:
        await asyncio.gather(*(store.close() for store in stores.values()))
        cpu.conn.close()
    return results


@contextlib.asynccontextmanager
async def migrated_database(prefix: str) -> AsyncIterator[str]:
    """The URL of a new database with the schema migrated; dropped on the way out."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        await schema.migrate(url)
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def main(args: argparse.Namespace) -> dict:
    async with migrated_database("trk_commit") as url:
        sizes = await measure(url, args)
    return {
        "command": "python bench/commit_bench.py --sizes "
        + " ".join(str(s) for s in args.sizes)
        + f" --rounds {args.rounds}",
        "machine": platform.platform(),
        "per_commit_by_size": sizes,
    }


def report(result: dict) -> None:
    print(result["command"])
    print(f"{'fixes':>6} {'write':<18}{'wall ms':>9}{'client ms':>11}{'PG ms':>8}")
    for size, writes in result["per_commit_by_size"].items():
        for write, row in writes.items():
            print(
                f"{size:>6} {write:<18}{row['wall_ms']:>9.2f}"
                f"{row['client_cpu_ms']:>11.2f}{row['postgres_cpu_ms']:>8.2f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 20, 200, 5000])
    parser.add_argument("--rounds", type=int, default=4)
    outcome = asyncio.run(main(parser.parse_args()))
    report(outcome)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(outcome, indent=2) + "\n")
