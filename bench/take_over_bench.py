"""What a geofence take-over costs: a batch bringing the fixes of devices the
process does not hold (they reconnected here from another server process) reloads
their memberships from the stored events in one query, then evaluates; the next
batch of the same devices (held now) reads nothing. Times, per round of ``--take``
devices: the take-over batch, the held batch after it, the membership query alone,
and the take-over notice on Redis (``RedisDeviceNotices.announce_many``).

    .venv/bin/python bench/take_over_bench.py [--devices 20000] [--take 2000]

Needs PostgreSQL on 127.0.0.1 (creates and drops its own database) and Redis on
127.0.0.1:6379 (a key prefix of its own, deleted at the end). Prints a table and
writes bench/results/take_over_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
import uuid
from pathlib import Path

from commit_bench import migrated_database

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.events import EventType, TrackingEvent, event_id
from tracking_grpc.geofence.model import FenceSpec, ShapeSpec
from tracking_grpc.geofence.processor import GeofenceProcessor
from tracking_grpc.storage.postgres_fences import (
    PostgresEventRepository,
    PostgresFenceRepository,
    PostgresGeofenceDatabase,
)
from tracking_grpc.storage.redis_client import Connection
from tracking_grpc.storage.redis_notices import RedisDeviceNotices

RESULTS = Path(__file__).parent / "results" / "take_over_bench.json"
REDIS_URL = "redis://127.0.0.1:6379/0"
T0 = 1_704_700_800_000  # Monday 2024-01-08 08:00 UTC
# A 200 m x 200 m square at 52.52 N, 13.40 E; INSIDE lies in it, FAR 14 km away.
SQUARE = ShapeSpec.wkt(
    "POLYGON((13.3985 52.5191, 13.4015 52.5191, 13.4015 52.5209, 13.3985 52.5209, "
    "13.3985 52.5191))"
)
INSIDE, FAR = (52.52, 13.40), (52.60, 13.60)
TENANT = "bench"


def stored_events(devices: int) -> list[TrackingEvent]:
    """Every device entered the square; every other one left it again."""
    made = []
    for n in range(devices):
        device = f"dev-{n}"
        kinds = [EventType.ENTER] + ([EventType.EXIT] if n % 2 else [])
        for k, kind in enumerate(kinds):
            time_ms = T0 + k * 60_000
            made.append(
                TrackingEvent(
                    event_id=event_id(TENANT, device, kind, time_ms, "sq"),
                    tenant=TENANT,
                    device=device,
                    type=kind,
                    time_ms=time_ms,
                    lat=INSIDE[0],
                    lon=INSIDE[1],
                    fix_seq=k + 1,
                    created_ms=time_ms,
                    fence_id="sq",
                )
            )
    return made


def fixes(devices: list[str], seq: int, at_s: int) -> FixBatch:
    size = len(devices)
    return FixBatch.from_columns(
        TENANT,
        devices,
        [seq] * size,
        [T0 + at_s * 1000] * size,
        [FAR[0]] * size,
        [FAR[1]] * size,
        accuracy_m=[5.0] * size,
    )


async def measure(url: str, args: argparse.Namespace) -> dict:
    db = await PostgresGeofenceDatabase.open(url)
    fences, events = PostgresFenceRepository(db), PostgresEventRepository(db)
    prefix = f"takeover-bench-{uuid.uuid4().hex[:8]}:"
    notices = RedisDeviceNotices(Connection(REDIS_URL), prefix, _nothing)
    try:
        await fences.create(TENANT, FenceSpec("sq", SQUARE), T0)
        made = stored_events(args.devices)
        for first in range(0, len(made), 1_000):
            await events.add(made[first : first + 1_000])
        processor = GeofenceProcessor(fences, events)
        processor.announce = _announce_nothing  # another process exists
        await processor.process(fixes(["scout"], 1, 600))  # the tenant's load
        rows = []
        for r in range(args.rounds):
            group = [f"dev-{n}" for n in range(r * args.take, (r + 1) * args.take)]
            started = time.perf_counter()
            raised = await processor.process(fixes(group, 5, 600))
            take_over = time.perf_counter() - started
            started = time.perf_counter()
            await processor.process(fixes(group, 6, 660))
            held = time.perf_counter() - started
            started = time.perf_counter()
            found = await events.memberships(TENANT, group)
            query = time.perf_counter() - started
            started = time.perf_counter()
            await notices.announce_many(TENANT, group)
            notice = time.perf_counter() - started
            rows.append(
                {
                    "take_over_batch_ms": round(take_over * 1000, 2),
                    "held_batch_ms": round(held * 1000, 2),
                    "membership_query_ms": round(query * 1000, 2),
                    "notice_ms": round(notice * 1000, 2),
                    "exits": len(raised),
                    "memberships_read": len(found),
                }
            )
        steady = await held_batches(processor, args)
        return {
            "steady_batch_ms": steady,
            "command": f"python bench/take_over_bench.py --devices {args.devices} "
            f"--take {args.take} --rounds {args.rounds}",
            "machine": platform.platform(),
            "stored_events": len(made),
            "rounds": rows,
            "median": {
                key: statistics.median(row[key] for row in rows)
                for key in rows[0]
                if key.endswith("_ms")
            },
        }
    finally:
        client = await notices.connection.get()
        await client.delete(prefix + "erasures")
        await notices.close()
        await db.close()


async def held_batches(processor: GeofenceProcessor, args: argparse.Namespace) -> dict:
    """Median time of a batch of ``--take`` held devices, with other processes
    (the check for devices not held) and as the only process (no check)."""
    group = [f"dev-{n}" for n in range(args.take)]
    times: dict[str, list[float]] = {"shared": [], "alone": []}
    for n in range(20):
        mode = "shared" if n % 2 else "alone"
        processor.announce = _announce_nothing if mode == "shared" else None
        started = time.perf_counter()
        await processor.process(fixes(group, 10 + n, 700 + n))
        times[mode].append(time.perf_counter() - started)
    return {k: round(statistics.median(v) * 1000, 2) for k, v in times.items()}


async def _nothing(tenant: str, device: str) -> None:
    return None


async def _announce_nothing(tenant: str, devices: object) -> None:
    return None


async def main(args: argparse.Namespace) -> dict:
    async with migrated_database("trk_takeover") as url:
        return await measure(url, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20_000)
    parser.add_argument("--take", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=5)
    result = asyncio.run(main(parser.parse_args()))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(result["command"])
    print(f"{'take-over':>10} {'held':>8} {'query':>8} {'notice':>8}  (ms)")
    for row in result["rounds"]:
        print(
            f"{row['take_over_batch_ms']:>10} {row['held_batch_ms']:>8} "
            f"{row['membership_query_ms']:>8} {row['notice_ms']:>8}"
        )
    print("median", result["median"])
    print("held batch, shared / alone", result["steady_batch_ms"])
