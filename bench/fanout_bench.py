"""CPU of the routed live fan-out: the publisher per commit and a receiver per message.

    .venv/bin/python bench/fanout_bench.py [--commits 2000]

Publisher: ``RedisBroker.publish`` of commits of 10 fixes (a stream commit) and 500
fixes (a gateway batch) with 0, 1, 4 and 16 other processes interested in the
tenant (each in 100 of its 1,000 devices, so most commits match a few rows for
each), against the peer it replaced: the broadcast, one PUBLISH of the whole
commit. Process CPU time per commit, Redis round trips included.

Receiver: a server-like process of its own (``RedisBroker`` subscribed with an
interest in the whole tenant, a no-op handler) receiving messages of 1 and 50
fixes; its CPU per message (its process time from subscribed to all received).

Needs Redis on 127.0.0.1:6379 (scripts/test_services.sh); uses its own key prefix.
Prints a table and writes bench/results/fanout_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from tracking_grpc.core.fixes import FixBatch  # noqa: E402
from tracking_grpc.interest import TenantInterest  # noqa: E402
from tracking_grpc.storage.redis_broker import RedisBroker, encode  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"
RESULTS = ROOT / "bench" / "results" / "fanout_bench.json"
TENANT = "bench"
DEVICES = np.array([f"dev-{i:05d}" for i in range(1_000)], dtype=object)


def commit(rng: np.random.Generator, fixes: int, k: int) -> FixBatch:
    devices = rng.choice(DEVICES, size=fixes, replace=False)
    return FixBatch.from_columns(
        TENANT,
        devices,
        np.full(fixes, k + 1),
        np.full(fixes, 1_750_000_000_000 + k),
        rng.uniform(51, 52, fixes),
        rng.uniform(-1, 0, fixes),
    )


async def time_publish(prefix: str, fixes: int, interested: int, commits: int) -> float:
    """Process CPU µs per routed publish, ``interested`` other processes."""
    broker = await RedisBroker.open(REDIS_URL, prefix)
    rng = np.random.default_rng(interested)
    for p in range(interested):
        wanted = frozenset(rng.choice(DEVICES, size=100, replace=False).tolist())
        interest = {TENANT: TenantInterest(devices=wanted)}
        await broker.table.register(f"bench-{p}", interest, 600_000)
    batches = [commit(rng, fixes, k) for k in range(commits)]
    await broker.publish(batches[0])  # reads the table once
    started = time.process_time()
    for batch in batches:
        await broker.publish(batch)
    spent = time.process_time() - started
    for p in range(interested):
        await broker.table.register(f"bench-{p}", {}, 600_000)
    await broker.close()
    return spent / commits * 1e6


async def time_broadcast(prefix: str, fixes: int, commits: int) -> float:
    """Process CPU µs per commit as before: one PUBLISH of the whole commit."""
    client = aioredis.Redis.from_url(REDIS_URL)
    rng = np.random.default_rng(0)
    batches = [commit(rng, fixes, k) for k in range(commits)]
    started = time.process_time()
    for batch in batches:
        await client.publish(f"{prefix}updates", encode(batch))
    spent = time.process_time() - started
    await client.aclose()
    return spent / commits * 1e6


def receiver(prefix: str, ready, expected: int) -> None:
    """A subscriber process: counts fixes until ``expected`` have arrived."""

    async def run() -> None:
        broker = await RedisBroker.open(REDIS_URL, prefix)
        got = asyncio.Event()
        count = 0

        async def handle(batch: FixBatch) -> None:
            nonlocal count
            count += len(batch)
            if count >= expected:
                got.set()

        interest = {TENANT: TenantInterest(everything=True)}
        await broker.subscribe(handle, lambda: interest)
        await broker.interest_changed()
        ready.send(broker.process)
        started = time.process_time()
        await got.wait()
        ready.send(time.process_time() - started)
        await broker.close()

    asyncio.run(run())


async def time_receive(prefix: str, fixes: int, messages: int) -> dict[str, float]:
    """Receiver CPU µs per message of ``fixes`` fixes (its own process time)."""
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(
        target=receiver, args=(prefix, child, fixes * messages)
    )
    process.start()
    process_id = parent.recv()
    rng = np.random.default_rng(2)
    batches = [commit(rng, fixes, k) for k in range(messages)]
    data = [encode(b) for b in batches]
    channel = f"{prefix}fanout:{{{process_id}}}"
    client = aioredis.Redis.from_url(REDIS_URL)
    for k in range(0, messages, 50):
        async with client.pipeline(transaction=False) as pipe:
            for message in data[k : k + 50]:
                pipe.publish(channel, message)
            await pipe.execute()
    spent = await asyncio.to_thread(parent.recv)
    process.join(timeout=10)
    await client.aclose()
    return {
        "fixes_per_message": fixes,
        "us_per_message": spent / messages * 1e6,
        "us_per_fix": spent / messages / fixes * 1e6,
    }


async def main(args: argparse.Namespace) -> dict:
    prefix = f"fanoutbench{uuid.uuid4().hex[:8]}:"
    publish = []
    for fixes in (10, 500):
        commits = args.commits if fixes == 10 else args.commits // 10
        row = {
            "fixes_per_commit": fixes,
            "broadcast_us": await time_broadcast(prefix, fixes, commits),
        }
        for interested in (0, 1, 4, 16):
            key = f"routed_{interested}_us"
            row[key] = await time_publish(prefix, fixes, interested, commits)
        publish.append(row)
    receive = [await time_receive(prefix, f, args.messages) for f in (1, 50)]
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    return {"publish_cpu_per_commit": publish, "receive_cpu": receive}


def show(out: dict) -> None:
    print("Publisher CPU per commit, µs (process time, Redis round trips included):")
    print("  fixes/commit  broadcast  routed: 0 watching  1  4  16 processes")
    for r in out["publish_cpu_per_commit"]:
        print(
            f"  {r['fixes_per_commit']:>12} {r['broadcast_us']:>10.0f} "
            f"{r['routed_0_us']:>18.0f} {r['routed_1_us']:>3.0f} "
            f"{r['routed_4_us']:>3.0f} {r['routed_16_us']:>4.0f}"
        )
    print("Receiver CPU (a process of its own):")
    for r in out["receive_cpu"]:
        print(
            f"  {r['fixes_per_message']:>3} fixes/message: "
            f"{r['us_per_message']:.0f} µs per message, {r['us_per_fix']:.1f} per fix"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=2_000)
    parser.add_argument("--messages", type=int, default=4_000)
    result = asyncio.run(main(parser.parse_args()))
    show(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
