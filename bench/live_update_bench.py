"""What the live update and the broker publish cost after one group commit, on Redis:
wall time, the client's CPU and Redis's CPU per update, at stream-like and
gateway-like sizes. Uses only ``RedisLiveStore.update`` and ``RedisBroker.publish``,
so the same file measures any version of the package (run it from another checkout's
virtual environment to compare).

    .venv/bin/python bench/live_update_bench.py [--sizes 1 20 200 5000] [--updates 300]
        [--jitter-m 50] [--commits-per-write 2 4 --commit-size 25]

``--commits-per-write K`` also measures, per commit of ``--commit-size`` fixes, K
commits joined in one update and publish (as ``live_writer`` joins the commits of
its interval), each K alternated with one commit per write in the same run.

An update of size N carries the next fix of N devices drawn from a fleet of 10,000
near London, all moving: each to anywhere in the area (about half of them into
another GEO cell), or with ``--jitter-m`` within that distance of a home of its own
(few cross into another cell, as in a fleet's fixes a few seconds apart). Redis
CPU is the server's own (``INFO cpu``), so whatever else uses that Redis counts
too: an upper bound. Needs Redis on 127.0.0.1; uses its own key prefix and deletes
its keys. Prints a table and writes
bench/results/live_update_bench.json.
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
import redis

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.storage.redis_broker import RedisBroker
from tracking_grpc.storage.redis_live import RedisLiveStore

REDIS_URL = "redis://127.0.0.1:6379/0"
RESULTS = Path(__file__).parent / "results" / "live_update_bench.json"
FLEET = 10_000
WARM_UP = 50
_homes = np.random.default_rng(0)
HOMES = (
    51.5 + _homes.uniform(-0.5, 0.5, FLEET),
    -0.12 + _homes.uniform(-0.5, 0.5, FLEET),
)


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def update_batch(
    k: int, size: int, rng: np.random.Generator, t0: int, jitter_m: float = 0.0
) -> FixBatch:
    """The next fix of ``size`` devices: anywhere in the area (``jitter_m`` 0, so
    that about half of them change GEO cell), or within ``jitter_m`` of a home of
    their own, as a fleet between two fixes a few seconds apart."""
    devices = rng.choice(FLEET, size, replace=False)
    if jitter_m > 0:
        step = jitter_m / 111_000
        lat = HOMES[0][devices] + rng.uniform(-step, step, size)
        lon = HOMES[1][devices] + rng.uniform(-step, step, size)
    else:
        lat = 51.5 + rng.uniform(-0.5, 0.5, size)
        lon = -0.12 + rng.uniform(-0.5, 0.5, size)
    return FixBatch.from_columns(
        "bench",
        np.array([f"dev-{i:05d}" for i in devices], dtype=object),
        np.full(size, k + 1, dtype=np.uint64),
        np.full(size, t0 + k * 1000, dtype=np.int64),
        lat,
        lon,
        provider=np.ones(size, np.int8),
        received_ms=t0,
    )


async def measure(
    size: int, updates: int, jitter_m: float, per_write: int = 1
) -> dict[str, float]:
    """Per commit of ``size`` fixes: ``per_write`` commits go in one update and
    publish (``live_writer.LiveWriter`` joins the commits of its interval)."""
    prefix = f"trkliveb{uuid.uuid4().hex[:8]}:"
    live = await RedisLiveStore.open(REDIS_URL, prefix)
    broker = await RedisBroker.open(REDIS_URL, prefix)
    counter = redis.Redis.from_url(REDIS_URL)
    rng = np.random.default_rng(size)
    t0 = int(time.time() * 1000)
    try:
        for k in range(WARM_UP):
            await live.update(update_batch(k, size, rng, t0, jitter_m))
        batches = [
            update_batch(k, size, rng, t0, jitter_m)
            for k in range(WARM_UP, WARM_UP + updates)
        ]
        server, wall, client = (
            redis_cpu_s(counter),
            time.perf_counter(),
            time.process_time(),
        )
        for start in range(0, updates, per_write):
            joined = FixBatch.concat(batches[start : start + per_write])
            await broker.publish(await live.update(joined))
        wall = time.perf_counter() - wall
        client = time.process_time() - client
        server = redis_cpu_s(counter) - server
    finally:
        await asyncio.gather(live.close(), broker.close())
        keys = list(counter.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            counter.delete(*keys[i : i + 1000])
        counter.close()
    return {
        "wall_ms": round(wall / updates * 1e3, 3),
        "client_cpu_ms": round(client / updates * 1e3, 3),
        "redis_cpu_ms": round(server / updates * 1e3, 3),
        "updates": updates,
    }


async def main(args: argparse.Namespace) -> dict:
    sizes = {}
    for size in args.sizes:
        updates = args.updates if size < 1000 else max(20, args.updates // 10)
        sizes[str(size)] = await measure(size, updates, args.jitter_m)
    joined: dict[str, list[dict[str, float]]] = {}
    for per_write in args.commits_per_write:
        # Alternated with one commit per write, the peer, in the same run.
        for k in (1, per_write):
            row = await measure(args.commit_size, args.updates, args.jitter_m, k)
            joined.setdefault(str(k), []).append(row)
    return {
        "command": "python bench/live_update_bench.py --sizes "
        + " ".join(str(s) for s in args.sizes)
        + f" --updates {args.updates}"
        + (f" --jitter-m {args.jitter_m:g}" if args.jitter_m else "")
        + (
            " --commits-per-write "
            + " ".join(str(k) for k in args.commits_per_write)
            + f" --commit-size {args.commit_size}"
            if args.commits_per_write
            else ""
        ),
        "machine": platform.platform(),
        "per_update_by_size": sizes,
        "per_commit_by_commits_per_write": joined,
    }


def report(result: dict) -> None:
    print(result["command"])
    print(f"{'fixes':>6}{'wall ms':>10}{'client ms':>11}{'Redis ms':>10}")
    for size, row in result["per_update_by_size"].items():
        print(
            f"{size:>6}{row['wall_ms']:>10.2f}{row['client_cpu_ms']:>11.2f}"
            f"{row['redis_cpu_ms']:>10.2f}"
        )
    joined = result["per_commit_by_commits_per_write"]
    if joined:
        print(f"per commit: {'commits/write':>14}{'wall ms':>10}{'client ms':>11}")
        for k, rows in joined.items():
            for row in rows:
                print(
                    f"{'':12}{k:>14}{row['wall_ms']:>10.2f}"
                    f"{row['client_cpu_ms']:>11.2f}  Redis {row['redis_cpu_ms']:.2f}"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 20, 200, 5000])
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument(
        "--jitter-m",
        type=float,
        default=0.0,
        help="devices stay within this of a home of their own (0: anywhere)",
    )
    parser.add_argument(
        "--commits-per-write",
        type=int,
        nargs="*",
        default=[],
        help="also measure per commit with this many commits in one write, each "
        "against one commit per write in the same run",
    )
    parser.add_argument("--commit-size", type=int, default=25)
    parser.add_argument("--json", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    outcome = asyncio.run(main(arguments))
    report(outcome)
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps(outcome, indent=2) + "\n")
