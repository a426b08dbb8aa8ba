"""What each part of the fixes schema costs PostgreSQL per stored fix: the schema as
shipped against the same schema without one of its secondary indexes, or with a
device table that leaves room for in-page (HOT) updates, each on a database of its
own, alternating, in one run.

    .venv/bin/python bench/row_cost.py [--size 2000] [--rounds 3] [--repeats 2]

A commit carries one fix each of ``--size`` devices of a fleet of 10,000, every fix
the device's next (gateway batches look like this). The variants are not proposals:
each index serves a query (see docs/storage.md); the table says what the gateway's
ceiling is made of. Needs PostgreSQL with PostGIS on 127.0.0.1; creates and drops
its own databases. Prints a table and writes bench/results/row_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import numpy as np
import psycopg
from commit_bench import BackendCpu, Fleet, migrated_database, run_round

from tracking_grpc.storage.postgres import PostgresHistoryStore

RESULTS = Path(__file__).parent / "results" / "row_cost.json"
VARIANTS: dict[str, list[str]] = {
    "as shipped": [],
    "without the (tenant, device, seq) index": ["DROP INDEX fixes_device_seq"],
    "without the SP-GiST position index": ["DROP INDEX fixes_position"],
    "without the BRIN time index": ["DROP INDEX fixes_time"],
    "devices with fillfactor 70": [
        "ALTER TABLE devices SET (fillfactor = 70)",
        "VACUUM FULL devices",
    ],
}


async def measure(ddl: list[str], args: argparse.Namespace) -> np.ndarray:
    """Wall, client CPU and PostgreSQL CPU microseconds per fix of one variant."""
    async with migrated_database("trk_row_cost") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in ddl:
                conn.execute(statement)
        store = await PostgresHistoryStore.open(url)
        cpu = BackendCpu(url)
        fleet = Fleet("bench", int(time.time() * 1000) - 3_600_000)
        try:
            # Warm up: every device row exists, the statements are prepared.
            await run_round(store, fleet, args.size, 10, cpu)
            total = np.zeros(3)
            for _ in range(args.rounds):
                total += await run_round(store, fleet, args.size, 10, cpu)
        finally:
            await store.close()
            cpu.conn.close()
    return total * 1e6 / (args.size * 10 * args.rounds)


async def main(args: argparse.Namespace) -> dict:
    runs: dict[str, list[np.ndarray]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, ddl in VARIANTS.items():
            runs[name].append(await measure(ddl, args))
    shipped = np.mean(runs["as shipped"], axis=0)
    variants = {}
    for name, samples in runs.items():
        mean = np.mean(samples, axis=0)
        variants[name] = {
            "wall_us_per_fix": round(float(mean[0]), 2),
            "client_us_per_fix": round(float(mean[1]), 2),
            "postgres_us_per_fix": round(float(mean[2]), 2),
            "postgres_us_saved": round(float(shipped[2] - mean[2]), 2),
            "postgres_us_runs": [round(float(s[2]), 2) for s in samples],
        }
    return {
        "bench": "row_cost",
        "machine": platform.node(),
        "size": args.size,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "variants": variants,
    }


def report(result: dict) -> None:
    print(f"{'schema':42} {'wall µs':>8} {'PG µs':>7} {'PG saved':>9}  per fix")
    for name, row in result["variants"].items():
        print(
            f"{name:42} {row['wall_us_per_fix']:8.2f} "
            f"{row['postgres_us_per_fix']:7.2f} {row['postgres_us_saved']:9.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000, help="fixes per commit")
    parser.add_argument("--rounds", type=int, default=3, help="10 commits each")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant")
    arguments = parser.parse_args()
    outcome = asyncio.run(main(arguments))
    report(outcome)
    RESULTS.write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"wrote {RESULTS}")
