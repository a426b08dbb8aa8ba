"""Point-in-fence decisions per second on 10k polygon fences, against PostGIS and a
per-fix shapely loop in the same run; and geofence events per second through Track.

    .venv/bin/python bench/geofence_bench.py [--points 1000000] [--quick]

Part 1 draws 10,000 irregular polygon fences (50-500 m across, 5-11 vertices) over a
46 km x 49 km area and random points over the same area, then answers "which fences
contain each point" with: this service's FenceIndex (grid of cells decided wholly
inside/outside, exact test only near edges), a prepared shapely STRtree query in one
call, a PostGIS join (ST_Contains, GiST index, points in a table) on a private
database, and a per-fix shapely loop. Every method's pairs are compared with the
STRtree's. The process is pinned to one core (PostgreSQL runs in its own process).

Part 2 measures the detector alone (a batch of fixes of many devices against the same
fences, events per second) and end to end: a real server on port 0 (embedded store,
in this process), devices streaming batches over Track with want_events, every fix
crossing a fence edge; events received per second.

Prints a table and writes bench/results/geofence_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import shapely

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.geofence.detector import FenceDetector
from tracking_grpc.geofence.index import CompiledFence, FenceIndex
from tracking_grpc.geofence.model import FenceSpec, ShapeSpec

RESULTS = Path(__file__).resolve().parent / "results" / "geofence_bench.json"
PG_ADMIN_URL = os.environ.get(
    "TRACKING_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
LAT0, LON0, DLAT, DLON = 53.40, -2.95, 0.22, 0.35
M_PER_DEG_LAT = 111_000.0


def polygon_fences(count: int, rng: np.random.Generator) -> list[FenceSpec]:
    """Irregular star-shaped polygons, 50-500 m across, over the area."""
    cos = np.cos(np.radians(LAT0))
    cx = LON0 + rng.uniform(-DLON, DLON, count)
    cy = LAT0 + rng.uniform(-DLAT, DLAT, count)
    specs = []
    for i in range(count):
        k = int(rng.integers(5, 12))
        angle = (np.arange(k) + rng.uniform(0, 0.8, k)) * 2 * np.pi / k
        radius = rng.uniform(25, 250, k)
        xs = cx[i] + radius * np.cos(angle) / (M_PER_DEG_LAT * cos)
        ys = cy[i] + radius * np.sin(angle) / M_PER_DEG_LAT
        ring = np.column_stack([xs, ys])
        specs.append(FenceSpec(f"f{i}", ShapeSpec.wkt(shapely.Polygon(ring).wkt)))
    return specs


def random_points(
    count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    lon = LON0 + rng.uniform(-DLON * 1.02, DLON * 1.02, count)
    lat = LAT0 + rng.uniform(-DLAT * 1.02, DLAT * 1.02, count)
    return lon, lat


def timed(fn, *args, rounds: int = 3):
    """(best seconds, result) over rounds."""
    best, result = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def pair_set(pts: np.ndarray, rows: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(pts.tolist(), rows.tolist(), strict=True))


def postgis_join(
    index: FenceIndex, lon: np.ndarray, lat: np.ndarray
) -> tuple[float, set[tuple[int, int]]]:
    """Seconds of the ST_Contains join on a private database, and its pairs."""
    name = f"geo_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(f"{base}/{name}", autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
            conn.execute("CREATE TABLE fences (row int, area geometry(Geometry, 4326))")
            conn.execute("CREATE TABLE pts (id int, geom geometry(Point, 4326))")
            with conn.cursor().copy("COPY fences (row, area) FROM STDIN") as copy:
                for row, geom in enumerate(index.area):
                    copy.write_row((row, f"SRID=4326;{geom.wkt}"))
            text = io.StringIO()
            for i, (x, y) in enumerate(zip(lon.tolist(), lat.tolist(), strict=True)):
                text.write(f"{i}\tSRID=4326;POINT({x!r} {y!r})\n")
            with conn.cursor().copy("COPY pts (id, geom) FROM STDIN") as copy:
                copy.write(text.getvalue())
            conn.execute("CREATE INDEX ON fences USING gist (area)")
            conn.execute("ANALYZE fences")
            conn.execute("ANALYZE pts")
            query = (
                "SELECT p.id, f.row FROM pts p JOIN fences f "
                "ON ST_Contains(f.area, p.geom)"
            )
            conn.execute(query).fetchall()  # warm the cache
            start = time.perf_counter()
            rows = conn.execute(query).fetchall()
            seconds = time.perf_counter() - start
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return seconds, {(int(i), int(r)) for i, r in rows}


def per_fix_loop(index: FenceIndex, lon: np.ndarray, lat: np.ndarray):
    found = set()
    for i, (x, y) in enumerate(zip(lon.tolist(), lat.tolist(), strict=True)):
        for row in index.tree.query(shapely.Point(x, y), predicate="intersects"):
            found.add((i, int(row)))
    return found


def point_in_fence(points: int, pg_points: int, loop_points: int) -> dict:
    rng = np.random.default_rng(20261204)
    specs = polygon_fences(10_000, rng)
    start = time.perf_counter()
    index = FenceIndex([CompiledFence.of(s) for s in specs])
    build_s = time.perf_counter() - start
    lon, lat = random_points(points, rng)
    ours_s, (pts, rows) = timed(index.contains, lon, lat)
    tree_s, (tpts, trows) = timed(
        lambda x, y: index.tree.query(shapely.points(x, y), predicate="intersects"),
        lon,
        lat,
    )
    reference = pair_set(tpts, trows)
    agree = pair_set(pts, rows) == reference
    sub = slice(0, pg_points)
    pg_s, pg_pairs = postgis_join(index, lon[sub], lat[sub])
    pg_reference = {p for p in reference if p[0] < pg_points}
    loop = slice(0, loop_points)
    loop_s, loop_pairs = timed(per_fix_loop, index, lon[loop], lat[loop], rounds=1)
    loop_reference = {p for p in reference if p[0] < loop_points}
    codes = index.grid.lookup(lon, lat)
    return {
        "fences": len(specs),
        "points": points,
        "index_build_s": round(build_s, 2),
        "points_with_exact_test": round(float((codes < 0).mean()), 4),
        "points_decided_inside_by_cell": round(float((codes > 0).mean()), 4),
        "pairs_found": len(reference),
        "methods": [
            {
                "method": "FenceIndex.contains (grid + exact near edges)",
                "points": points,
                "seconds": ours_s,
                "points_per_s": points / ours_s,
                "same_pairs_as_strtree": agree,
            },
            {
                "method": "shapely STRtree.query, prepared, one call",
                "points": points,
                "seconds": tree_s,
                "points_per_s": points / tree_s,
                "same_pairs_as_strtree": True,
            },
            {
                "method": "PostGIS join ST_Contains + GiST (points in a table)",
                "points": pg_points,
                "seconds": pg_s,
                "points_per_s": pg_points / pg_s,
                "same_pairs_as_strtree": pg_pairs == pg_reference,
            },
            {
                "method": "per-fix shapely loop (STRtree.query per point)",
                "points": loop_points,
                "seconds": loop_s,
                "points_per_s": loop_points / loop_s,
                "same_pairs_as_strtree": loop_pairs == loop_reference,
            },
        ],
    }


def detector_throughput(devices: int, fixes_per_device: int) -> dict:
    """Events per second of the detector alone, every fix crossing an edge."""
    rng = np.random.default_rng(7)
    centres = rng.uniform(-1, 1, (devices, 2)) * [DLON, DLAT] + [LON0, LAT0]
    fences = [
        FenceSpec(f"c{i}", ShapeSpec.circle(float(y), float(x), 100.0))
        for i, (x, y) in enumerate(centres)
    ]
    index = FenceIndex.build(fences)
    n = devices * fixes_per_device
    device = np.repeat(np.arange(devices), fixes_per_device)
    step = np.tile(np.arange(fixes_per_device), devices)
    away = (step % 2 == 1) * 0.006  # ~400 m east on odd fixes
    batch = FixBatch.from_columns(
        "bench",
        device.astype(str),
        step + 1,
        1_700_000_000_000 + step * 10_000,
        centres[device, 1],
        centres[device, 0] + away,
        accuracy_m=np.full(n, 8.0),
    )
    detector = FenceDetector("bench")
    start = time.perf_counter()
    events = detector.evaluate(batch, index, 0)
    seconds = time.perf_counter() - start
    return {
        "fences": devices,
        "devices": devices,
        "fixes": n,
        "events": len(events),
        "seconds": seconds,
        "events_per_s": len(events) / seconds,
    }


async def through_track(devices: int, batches: int, per_batch: int) -> dict:
    """Events per second delivered on Track streams by a real server on port 0."""
    import grpc
    from tracking.v1 import (
        common_pb2,
        geofence_pb2,
        geofence_pb2_grpc,
        track_pb2,
        track_pb2_grpc,
    )

    from tracking_grpc.config import Settings
    from tracking_grpc.server import TrackingServer

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(listen="127.0.0.1:0", data_dir=tmp)
        server = await TrackingServer.start(settings)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                fences = geofence_pb2_grpc.GeofenceStub(channel)
                for d in range(devices):
                    circle = common_pb2.Circle(
                        center=common_pb2.LatLng(lat=LAT0 + d * 0.01, lon=LON0),
                        radius_m=100.0,
                    )
                    await fences.CreateFence(
                        geofence_pb2.CreateFenceRequest(
                            fence=geofence_pb2.Fence(
                                fence_id=f"c{d}",
                                shape=geofence_pb2.FenceShape(circle=circle),
                            )
                        )
                    )
                track = track_pb2_grpc.TrackSessionStub(channel)
                expected = devices * (batches * per_batch - 0)
                start = time.perf_counter()
                counts = await asyncio.gather(
                    *[
                        _device(track, d, batches, per_batch, track_pb2, common_pb2)
                        for d in range(devices)
                    ]
                )
                seconds = time.perf_counter() - start
        finally:
            await server.stop(1)
    events = sum(counts)
    return {
        "devices": devices,
        "fixes": devices * batches * per_batch,
        "events_expected": expected,
        "events": events,
        "seconds": seconds,
        "events_per_s": events / seconds,
    }


async def _device(track, d, batches, per_batch, track_pb2, common_pb2) -> int:
    call = track.Track()
    await call.write(
        track_pb2.TrackRequest(
            hello=track_pb2.Hello(device_id=f"dev{d}", want_events=True)
        )
    )
    await call.read()
    t0 = time.time_ns() // 1_000_000 - 3_600_000
    lat = LAT0 + d * 0.01
    events = acks = 0
    seq = 0
    for _ in range(batches):
        fixes = []
        for _ in range(per_batch):
            seq += 1
            lon = LON0 + (0.006 if seq % 2 == 0 else 0.0)
            fixes.append(
                common_pb2.Fix(
                    seq=seq, time_ms=t0 + seq * 1000, lat=lat, lon=lon, accuracy_m=8.0
                )
            )
        await call.write(track_pb2.TrackRequest(batch=track_pb2.FixBatch(fixes=fixes)))
    want = batches * per_batch
    deadline = time.monotonic() + 120
    while (events < want or acks < batches) and time.monotonic() < deadline:
        response = await asyncio.wait_for(call.read(), 60)
        kind = response.WhichOneof("message")
        if kind == "ack":
            acks += 1
        elif kind == "event" and response.event.fence_id:
            events += 1
    await call.done_writing()
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="smaller, for a smoke run")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    points = 100_000 if args.quick else args.points
    part1 = point_in_fence(
        points, min(points, 200_000), 5_000 if args.quick else 20_000
    )
    part2 = detector_throughput(2_000 if args.quick else 10_000, 10)
    part3 = asyncio.run(through_track(20 if args.quick else 100, 10, 20))
    report = {
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "point_in_fence": part1,
        "detector": part2,
        "track_end_to_end": part3,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{part1['fences']} polygon fences, {part1['pairs_found']} containing pairs; "
        f"exact test for {part1['points_with_exact_test']:.1%} of points"
    )
    print(f"{'method':52s} {'points':>9s} {'points/s':>12s} {'same':>5s}")
    for m in part1["methods"]:
        print(
            f"{m['method']:52s} {m['points']:9d} {m['points_per_s']:12,.0f} "
            f"{'yes' if m['same_pairs_as_strtree'] else 'NO':>5s}"
        )
    print(
        f"detector alone: {part2['events']} events from {part2['fixes']} fixes "
        f"in {part2['seconds']:.2f} s = {part2['events_per_s']:,.0f} events/s"
    )
    print(
        f"through Track: {part3['events']}/{part3['events_expected']} events in "
        f"{part3['seconds']:.2f} s = {part3['events_per_s']:,.0f} events/s"
    )
    load = report["load_average_1_5_15"]
    print(f"machine load average {load} on {os.cpu_count()} cores; wrote {RESULTS}")


if __name__ == "__main__":
    main()
