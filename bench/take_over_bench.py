"""What a geofence take-over costs: a batch bringing the fixes of devices the
process does not hold (they reconnected here from another server process) reloads
their memberships from the stored events in one query, then evaluates; the next
batch of the same devices (held now) reads nothing. Times, per round of ``--take``
devices: the take-over batch, the held batch after it, the membership query alone,
the read of the stored fixes a take-over judges again (``fixes_before``) alone,
and the take-over notice on Redis (``RedisDeviceNotices.announce_many``).

Every device taken over has ``--history`` stored fixes, 10 s apart, up to the
take-over batch, received 10 s apart up to the bench's start (judged by the
process that held it, with no event since its ENTER or EXIT): the take-over
reads those received in the last 30 s (``dwell_lateness_s``; the first round's
three, fewer later) and the newest one before, and judges them again; it scans
up to REPLAY_FIXES + 1 per device. ``--history 0`` stores none;
``--no-history`` gives the processor no history store (a take-over reads the
events only, as before the fixes were read).

    .venv/bin/python bench/take_over_bench.py [--devices 20000] [--take 2000]
        [--history 40] [--no-history]

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
from tracking_grpc.geofence.processor import (
    REPLAY_FIXES,
    REPLAY_SPAN_MS,
    GeofenceProcessor,
)
from tracking_grpc.storage.postgres import PostgresHistoryStore
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


def fixes(
    devices: list[str],
    seq: int,
    at_s: int,
    where: list[tuple[float, float]] | None = None,
) -> FixBatch:
    size = len(devices)
    where = where or [FAR] * size
    return FixBatch.from_columns(
        TENANT,
        devices,
        [seq] * size,
        [T0 + at_s * 1000] * size,
        [w[0] for w in where],
        [w[1] for w in where],
        accuracy_m=[5.0] * size,
    )


async def store_history(
    history: PostgresHistoryStore, devices: list[str], count: int
) -> int:
    """``count`` fixes of each device, 10 s apart, ending before 600 s (the
    take-over batch's time): where each device was after its last event (in
    the square after an ENTER, far after an EXIT)."""
    stored = 0
    now_ms = time.time_ns() // 1_000_000
    for first in range(0, len(devices), 500):
        group = devices[first : first + 500]
        where = [FAR if int(d.split("-")[1]) % 2 else INSIDE for d in group]
        batches = [
            fixes(group, 100 + k, 600 - 10 * (count - k), where).with_received(
                now_ms - 10_000 * (count - k)
            )
            for k in range(count)
        ]
        if batches:
            stored += int((await history.store(FixBatch.concat(batches))).sum())
    return stored


async def measure(url: str, args: argparse.Namespace) -> dict:
    db = await PostgresGeofenceDatabase.open(url)
    history = await PostgresHistoryStore.open(url)
    fences, events = PostgresFenceRepository(db), PostgresEventRepository(db)
    prefix = f"takeover-bench-{uuid.uuid4().hex[:8]}:"
    notices = RedisDeviceNotices(Connection(REDIS_URL), prefix, _nothing)
    try:
        await fences.create(TENANT, FenceSpec("sq", SQUARE), T0)
        made = stored_events(args.devices)
        for first in range(0, len(made), 1_000):
            await events.add(made[first : first + 1_000])
        taken = [f"dev-{n}" for n in range(args.rounds * args.take)]
        fixes_stored = await store_history(history, taken, args.history)
        processor = GeofenceProcessor(
            fences, events, history=None if args.no_history else history
        )
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
            batch_ms = T0 + 600_000  # as the take-over reads them
            bounds = {d: (batch_ms - REPLAY_SPAN_MS, batch_ms) for d in group}
            recent_ms = time.time_ns() // 1_000_000 - 30_000
            read = await history.fixes_before(
                TENANT, bounds, REPLAY_FIXES + 1, recent_ms
            )
            fixes_query = time.perf_counter() - started
            started = time.perf_counter()
            await notices.announce_many(TENANT, group)
            notice = time.perf_counter() - started
            rows.append(
                {
                    "take_over_batch_ms": round(take_over * 1000, 2),
                    "held_batch_ms": round(held * 1000, 2),
                    "membership_query_ms": round(query * 1000, 2),
                    "fixes_query_ms": round(fixes_query * 1000, 2),
                    "notice_ms": round(notice * 1000, 2),
                    "exits": len(raised),
                    "memberships_read": len(found),
                    "fixes_read": len(read),
                }
            )
        steady = await held_batches(processor, args)
        return {
            "steady_batch_ms": steady,
            "command": f"python bench/take_over_bench.py --devices {args.devices} "
            f"--take {args.take} --rounds {args.rounds} --history {args.history}"
            + (" --no-history" if args.no_history else ""),
            "machine": platform.platform(),
            "stored_events": len(made),
            "stored_fixes": fixes_stored,
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
        await history.close()
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
    parser.add_argument("--history", type=int, default=40)
    parser.add_argument("--no-history", action="store_true")
    result = asyncio.run(main(parser.parse_args()))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(result["command"])
    print(
        f"{'take-over':>10} {'held':>8} {'query':>8} {'fixes':>8} {'notice':>8}  (ms)"
    )
    for row in result["rounds"]:
        print(
            f"{row['take_over_batch_ms']:>10} {row['held_batch_ms']:>8} "
            f"{row['membership_query_ms']:>8} {row['fixes_query_ms']:>8} "
            f"{row['notice_ms']:>8}"
        )
    print("median", result["median"])
    print("held batch, shared / alone", result["steady_batch_ms"])
