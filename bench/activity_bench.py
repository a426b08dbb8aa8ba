"""Stop and trip detection against MovingPandas, and history queries per second.

Part 1 runs our stop detector and MovingPandas' ``TrajectoryStopDetector`` on the
same fixes (the New York AIS hour and the Liverpool bus trace) with the same rule
(a stop stays within a 100 m diameter for 5 minutes), and reports how well the
stops agree and how fast each is. Part 2 stores a month of synthetic fixes for
many devices in a history store (a scratch PostgreSQL/PostGIS database when
``--pg-admin-url`` is given, else the embedded SQLite store) and measures history
queries per second.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'
    .venv/bin/python bench/activity_bench.py \
        [--pg-admin-url postgresql://postgres@127.0.0.1:5432/postgres]

Prints tables and writes bench/results/activity_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
import warnings
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np

from tracking_grpc.activity import patterns, queries, segments
from tracking_grpc.activity.params import ActivityConfig, ActivityParams
from tracking_grpc.activity.track import analyse
from tracking_grpc.config import Settings
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.storage import factory
from tracking_grpc.traces import read_trace

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT.parent / "shared" / "data" / "traces"
RESULTS = ROOT / "bench" / "results" / "activity_bench.json"
RULE = replace(ActivityParams(), stop_radius_m=50.0, min_stop_s=300.0)
DATASETS = {
    "ais": "nyharbor_ais_2020-06-30_first_hour.csv",
    "bus": "liverpool_bus_route14_outbound.csv",
}


def ours(batch: FixBatch) -> tuple[list[segments.Stop], list[segments.Trip]]:
    a = analyse(batch, RULE, complete=True)
    return segments.stops(a), segments.trips(a, RULE)


def theirs(batch: FixBatch):
    """MovingPandas stops (device, start_ms, end_ms) and StopSplitter trip count."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import geopandas as gpd
        import movingpandas as mpd
        import pandas as pd

        frame = pd.DataFrame(
            {
                "device": batch.device.astype(str),
                "t": pd.to_datetime(batch.time_ms, unit="ms"),
            }
        )
        frame = frame.drop_duplicates(["device", "t"])
        keep = frame.index.to_numpy()
        geo = gpd.GeoDataFrame(
            frame,
            geometry=gpd.points_from_xy(batch.lon[keep], batch.lat[keep]),
            crs="EPSG:4326",
        ).set_index("t")
        collection = mpd.TrajectoryCollection(geo, traj_id_col="device")
        detector = mpd.TrajectoryStopDetector(collection)
        found = detector.get_stop_segments(
            max_diameter=2 * RULE.stop_radius_m,
            min_duration=timedelta(seconds=RULE.min_stop_s),
        )
        stops = [
            (
                str(t.id).rsplit("_", 2)[0],
                int(t.get_start_time().timestamp() * 1000),
                int(t.get_end_time().timestamp() * 1000),
            )
            for t in found.trajectories
        ]
        trips = mpd.StopSplitter(collection).split(
            max_diameter=2 * RULE.stop_radius_m,
            min_duration=timedelta(seconds=RULE.min_stop_s),
            min_length=RULE.min_trip_distance_m,
        )
        return stops, len(trips.trajectories)


def agreement(a: list[tuple[str, int, int]], b: list[tuple[str, int, int]]) -> dict:
    """Stops of a matched by a stop of b (same device, time overlap >= half of
    the shorter one), both ways, and the Jaccard index of stopped time."""

    def matched(x, y) -> int:
        count = 0
        for device, s, e in x:
            for d2, s2, e2 in y:
                overlap = min(e, e2) - max(s, s2)
                if d2 == device and overlap >= 0.5 * max(1, min(e - s, e2 - s2)):
                    count += 1
                    break
        return count

    def total(x):
        return sum(e - s for _, s, e in x)

    inter = 0
    for device, s, e in a:
        for d2, s2, e2 in b:
            if d2 == device:
                inter += max(0, min(e, e2) - max(s, s2))
    union = total(a) + total(b) - inter
    return {
        "ours_matched": matched(a, b),
        "theirs_matched": matched(b, a),
        "stopped_time_jaccard": round(inter / union, 3) if union else 1.0,
    }


def part_one(repeat: int) -> dict:
    out = {}
    for name, file in DATASETS.items():
        batch = read_trace(TRACES / file).to_batch("bench").sorted_by_device_time()
        ours(batch)  # warm up
        t0 = time.perf_counter()
        for _ in range(repeat):
            stops, trips = ours(batch)
        ours_s = (time.perf_counter() - t0) / repeat
        t0 = time.perf_counter()
        their_stops, their_trips = theirs(batch)
        theirs_s = time.perf_counter() - t0
        mine = [(s.device, s.start_ms, s.end_ms) for s in stops]
        out[name] = {
            "fixes": len(batch),
            "devices": len(set(batch.device.tolist())),
            "ours_stops": len(mine),
            "theirs_stops": len(their_stops),
            "ours_trips": len(trips),
            "theirs_trips": their_trips,
            **agreement(mine, their_stops),
            "ours_s": round(ours_s, 4),
            "theirs_s": round(theirs_s, 3),
            "speed_ratio": round(theirs_s / ours_s, 1),
        }
    return out


def synthetic_day(device: int, day: int, start_ms: int, rng) -> FixBatch:
    """Home (fix every 10 min), drive to work (every 30 s), work, drive home."""
    home = np.array([47.0 + rng.uniform(-0.2, 0.2), 8.0 + rng.uniform(-0.3, 0.3)])
    work = home + rng.uniform(-0.05, 0.05, 2)
    base = start_ms + day * 86_400_000
    leave = base + int((7.5 + rng.uniform(0, 1)) * 3_600_000)
    back = base + int((16.5 + rng.uniform(0, 1.5)) * 3_600_000)
    drive_n = 60  # 30 min at one fix per 30 s
    parts_t = [
        np.arange(base, leave, 600_000),
        leave + np.arange(drive_n) * 30_000,
        np.arange(leave + drive_n * 30_000, back, 600_000),
        back + np.arange(drive_n) * 30_000,
        np.arange(back + drive_n * 30_000, base + 86_400_000, 600_000),
    ]
    f = np.linspace(0, 1, drive_n)[:, None]
    parts_xy = [
        np.repeat(home[None], parts_t[0].size, 0),
        home + f * (work - home),
        np.repeat(work[None], parts_t[2].size, 0),
        work + f * (home - work),
        np.repeat(home[None], parts_t[4].size, 0),
    ]
    t = np.concatenate(parts_t)
    xy = np.concatenate(parts_xy) + rng.normal(0, 5e-5, (t.size, 2))
    n = t.size
    return FixBatch.from_columns(
        "bench",
        [f"dev-{device:04d}"] * n,
        np.arange(n) + day * 1000 + 1,
        t,
        xy[:, 0],
        xy[:, 1],
        accuracy_m=np.full(n, 8.0),
    )


def scratch_database(admin_url: str) -> tuple[str, str]:
    """Create and migrate a private PostgreSQL database; returns (name, url)."""
    import os

    import psycopg

    from tracking_grpc.storage import schema

    name = f"activity_bench_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    asyncio.run(schema.migrate(url))
    return name, url


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def part_two(database_url: str, devices: int, days: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=tmp, database_url=database_url)
        store = await factory.open_history(settings)
        start_ms = 1_767_225_600_000  # 2026-01-01 UTC
        rng = np.random.default_rng(1)
        t0 = time.perf_counter()
        stored = 0
        pending: list[FixBatch] = []
        for d in range(devices):
            pending += [synthetic_day(d, k, start_ms, rng) for k in range(days)]
            if sum(len(b) for b in pending) >= 50_000 or d == devices - 1:
                batch = FixBatch.concat(pending)
                await store.store(batch.with_received(start_ms + days * 86_400_000))
                stored += len(batch)
                pending = []
        load_s = time.perf_counter() - t0
        config = ActivityConfig()
        results: dict[str, str | int | float] = {
            "backend": "postgresql" if database_url else "sqlite",
            "devices": devices,
            "days": days,
            "fixes": stored,
            "load_fixes_per_s": round(stored / load_s),
        }

        async def day_trips(device: str, day: int):
            found = await queries.load(
                store,
                config,
                "bench",
                device,
                start_ms + day * 86_400_000,
                start_ms + (day + 1) * 86_400_000,
            )
            return found.trips()

        async def month_summary(device: str, day: int):
            found = await queries.load(
                store, config, "bench", device, start_ms, start_ms + days * 86_400_000
            )
            return patterns.daily_summary(
                found.analysis,
                found.trips(),
                found.stops(),
                start_ms,
                start_ms + days * 86_400_000,
                "UTC",
            )

        async def day_track(device: str, day: int):
            return await store.history(
                "bench",
                device,
                start_ms + day * 86_400_000,
                start_ms + (day + 1) * 86_400_000,
            )

        for name, query in [
            ("track_1_day", day_track),
            ("trips_1_day", day_trips),
            ("daily_summary_1_month", month_summary),
        ]:
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds and count < 5000:
                await query(f"dev-{rng.integers(devices):04d}", int(rng.integers(days)))
                count += 1
            results[name + "_per_s"] = round(count / (time.perf_counter() - t0), 1)
        await store.close()
        return results


def part_three(devices: int, seconds: int) -> dict:
    """Live processing: devices at one fix a second, half parked, half driving.

    Every batch holds one fix of every device (the worst case for the tails kept
    per device); reports the steady rate once tails are full.
    """
    from tracking_grpc.activity.processor import ActivityProcessor

    rng = np.random.default_rng(0)
    processor = ActivityProcessor()
    lat0 = 47 + rng.uniform(-0.1, 0.1, devices)
    lon0 = 8 + rng.uniform(-0.1, 0.1, devices)
    moving = rng.random(devices) < 0.5
    names = np.array([f"d{i}" for i in range(devices)], dtype=object)
    start = 1_767_225_600_000
    took = []
    for k in range(seconds):
        jitter = rng.normal(0, 5, devices) / 111_195
        lat = lat0 + np.where(moving, k * 10 / 111_195, jitter)
        batch = FixBatch.from_columns(
            "bench",
            names,
            np.full(devices, k + 1),
            np.full(devices, start + k * 1000),
            lat,
            lon0,
            accuracy_m=np.full(devices, 5.0),
        )
        t0 = time.perf_counter()
        processor.apply(batch, created_ms=0)
        took.append(time.perf_counter() - t0)
    steady = float(np.mean(took[-60:]))
    return {
        "devices": devices,
        "seconds_of_fixes": seconds,
        "steady_batch_ms": round(steady * 1000, 1),
        "steady_fixes_per_s": round(devices / steady),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pg-admin-url",
        default="",
        help="PostgreSQL admin URL on loopback (e.g. postgresql://postgres@127.0.0.1"
        ":5432/postgres): a scratch database is created there and dropped after",
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=10.0, help="per query kind")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-history", action="store_true")
    args = parser.parse_args()

    detection = part_one(args.repeat)
    print(
        f"{'data':5} {'fixes':>6} {'stops us/mp':>12} {'trips us/mp':>12} "
        f"{'matched us/mp':>14} {'jaccard':>8} {'ours s':>8} {'mp s':>7} {'x':>6}"
    )
    for name, r in detection.items():
        print(
            f"{name:5} {r['fixes']:6d} {r['ours_stops']:5d}/{r['theirs_stops']:<6d} "
            f"{r['ours_trips']:5d}/{r['theirs_trips']:<6d} "
            f"{r['ours_matched']:6d}/{r['theirs_matched']:<7d} "
            f"{r['stopped_time_jaccard']:8.3f} {r['ours_s']:8.4f} {r['theirs_s']:7.2f} "
            f"{r['speed_ratio']:6.1f}"
        )
    live = part_three(1000, 420)
    print(f"live: {live}")
    report = {"machine": platform.platform(), "detection": detection, "live": live}
    if args.skip_history and RESULTS.exists():
        report["history"] = json.loads(RESULTS.read_text()).get("history")
    if not args.skip_history:
        name, url = (
            scratch_database(args.pg_admin_url) if args.pg_admin_url else ("", "")
        )
        try:
            history = asyncio.run(part_two(url, args.devices, args.days, args.seconds))
        finally:
            if name:
                drop_database(args.pg_admin_url, name)
        report["history"] = history
        for key, value in history.items():
            print(f"{key:28} {value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
