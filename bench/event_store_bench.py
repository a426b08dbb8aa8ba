"""What one stored event costs: the event store's batched write (``add``, 1,000
events per transaction, as ``EventStoreListener`` writes) on SQLite and PostgreSQL,
and, with Redis, the outbox's publish (read unpublished, XADD, mark published);
geofence events against activity events, which carry an ActivityDetail as JSON.
Per event: wall time, the client's CPU, on PostgreSQL the CPU of the backends of
the bench's own database, and for the publish the CPU of a Redis server of the
bench's own (all it does: what one event costs the shard holding an event stream).

    .venv/bin/python bench/event_store_bench.py [--events 20000]

Needs PostgreSQL with PostGIS on 127.0.0.1 and redis-server installed; creates and
drops its own database and starts and stops its own Redis on a free loopback port.
Prints a table and writes bench/results/event_store_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from commit_bench import BackendCpu, migrated_database

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.services import RedisServer
from tracking_grpc.events import ActivityDetail, EventType, TrackingEvent, event_id
from tracking_grpc.geofence.delivery import STORE_CHUNK, StreamPublisher
from tracking_grpc.loadgen import procstat
from tracking_grpc.storage.fences import EventRepository
from tracking_grpc.storage.postgres_fences import (
    PostgresEventRepository,
    PostgresGeofenceDatabase,
)
from tracking_grpc.storage.redis_client import Connection
from tracking_grpc.storage.sqlite_fences import (
    SqliteEventRepository,
    SqliteGeofenceDatabase,
)

RESULTS = Path(__file__).parent / "results" / "event_store_bench.json"
DEVICES = 10_000


def events(kind: str, count: int, start_ms: int) -> list[TrackingEvent]:
    """``count`` events of a fleet of DEVICES, one per device in turn."""
    made = []
    for n in range(count):
        device, time_ms = f"dev-{n % DEVICES}", start_ms + n
        if kind == "geofence":
            made.append(_event(device, EventType.ENTER, time_ms, "depot", None, "8"))
        else:
            detail = ActivityDetail(
                motion=3, previous_motion=1, speed_mps=13.2, odometer_m=48_211.5
            )
            made.append(
                _event(device, EventType.MOTION_CHANGED, time_ms, "", detail, "")
            )
    return made


def _event(device, kind, time_ms, fence_id, detail, accuracy) -> TrackingEvent:
    return TrackingEvent(
        event_id=event_id("bench", device, kind, time_ms, fence_id or "activity"),
        tenant="bench",
        device=device,
        type=kind,
        time_ms=time_ms,
        lat=60.17,
        lon=24.94,
        fix_seq=time_ms,
        created_ms=time_ms,
        fence_id=fence_id,
        attributes={"accuracy_m": accuracy} if accuracy else {},
        activity=detail,
    )


async def timed(
    work: Callable[[], Awaitable[None]],
    count: int,
    backend: BackendCpu | None = None,
    redis: RedisServer | None = None,
) -> dict[str, float]:
    """Wall and client CPU microseconds per event of ``work``; given ``backend``
    and ``redis``, their CPU per event too."""
    meters: dict[str, Callable[[], float]] = {}
    if backend is not None:
        meters["postgres_cpu_us"] = backend
    if redis is not None:
        meters["redis_cpu_us"] = _redis_cpu(redis)
    before = {name: meter() for name, meter in meters.items()}
    wall, cpu = time.perf_counter(), time.process_time()
    await work()
    result = {
        "wall_us": (time.perf_counter() - wall) * 1e6 / count,
        "client_cpu_us": (time.process_time() - cpu) * 1e6 / count,
    }
    for name, meter in meters.items():
        result[name] = (meter() - before[name]) * 1e6 / count
    return result


def _redis_cpu(redis: RedisServer) -> Callable[[], float]:
    assert redis.process is not None
    pid = redis.process.pid
    return lambda: procstat.cpu_by_pid([pid]).get(pid, 0.0)


async def store_all(repository: EventRepository, batch: list[TrackingEvent]) -> None:
    for start in range(0, len(batch), STORE_CHUNK):
        await repository.add(batch[start : start + STORE_CHUNK])


async def publish_all(publisher: StreamPublisher, repository: EventRepository) -> None:
    while chunk := await repository.unpublished(500):
        await publisher._publish(chunk)
        await repository.mark_published(chunk)


async def measure(args: argparse.Namespace, redis: RedisServer) -> dict:
    """Each kind on a store of its own, so neither writes into the other's rows."""
    results: dict[str, dict] = {}
    start_ms = int(time.time() * 1000) - 86_400_000
    for kind in ("geofence", "activity"):
        batch = events(kind, args.events, start_ms)
        with tempfile.TemporaryDirectory() as folder:
            sqlite = await SqliteGeofenceDatabase.open(Path(folder) / "events.sqlite3")
            work = functools.partial(store_all, SqliteEventRepository(sqlite), batch)
            results[f"sqlite add, {kind}"] = await timed(work, len(batch))
            await sqlite.close()
        async with migrated_database("trk_event_bench") as url:
            results.update(await measure_postgres(url, kind, batch, redis))
    return {
        "command": f"python bench/event_store_bench.py --events {args.events}",
        "machine": platform.platform(),
        "per_event": results,
    }


async def measure_postgres(
    url: str, kind: str, batch: list[TrackingEvent], redis: RedisServer
) -> dict[str, dict]:
    database = await PostgresGeofenceDatabase.open(url)
    repository = PostgresEventRepository(database)
    stream = f"trkbench-{uuid.uuid4().hex[:8]}:events"
    publisher = StreamPublisher(Connection(redis.url), stream, repository)
    backend = BackendCpu(url)
    try:
        work = functools.partial(store_all, repository, batch)
        added = await timed(work, len(batch), backend)
        publish = functools.partial(publish_all, publisher, repository)
        published = await timed(publish, len(batch), backend, redis)
    finally:
        backend.conn.close()
        await publisher.connection.close()
        await database.close()
    return {
        f"postgres add, {kind}": added,
        f"postgres outbox to redis, {kind}": published,
    }


def report(result: dict) -> None:
    print(result["command"])
    print(
        f"{'step':<36}{'wall':>8}{'client CPU':>12}{'PostgreSQL':>12}{'Redis':>12}"
        "  (µs per event)"
    )
    for step, row in result["per_event"].items():
        cells = [row.get(k) for k in ("postgres_cpu_us", "redis_cpu_us")]
        shown = "".join(f"{'–' if c is None else f'{c:.1f}':>12}" for c in cells)
        print(f"{step:<36}{row['wall_us']:>8.1f}{row['client_cpu_us']:>12.1f}{shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    with tempfile.TemporaryDirectory(prefix="trk-event-bench-") as folder:
        redis = RedisServer(Path(folder))
        redis.start()
        try:
            result = asyncio.run(measure(parser.parse_args(), redis))
        finally:
            redis.stop()
    report(result)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
