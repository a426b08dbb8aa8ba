"""Route benchmark: routes/s, matrix size against time, optimisation time, monitoring.

Usage: python bench/route_bench.py [--quick]

Prepares the Helsinki and Porto datasets in a temporary directory, then measures,
each against a peer in the same run:

- routes per second on one thread, on two threads, and through gRPC;
- how much of the interpreter is left while OSRM or VROOM works in a thread;
- travel tables of n points against n² single routes;
- VROOM plans for 50, 200 and 1,000 jobs against a nearest-neighbour order;
- route monitoring fixes per second over arrays of devices against evaluating the
  same fixes one device at a time;
- the Porto taxi trips: share matched, confidence, and ETA errors before and after
  learning travel times (two-fold).

Prints a table per part and writes bench/results/route_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "generated")]

from tests.routes import porto, support  # noqa: E402
from tracking_grpc.core.fixes import FixBatch  # noqa: E402
from tracking_grpc.routing import datasets, optimise  # noqa: E402
from tracking_grpc.routing.engine import Router, RoutingEngine  # noqa: E402
from tracking_grpc.routing.learning import TravelTimeModel  # noqa: E402
from tracking_grpc.routing.monitor import PlannedRoute, RouteMonitor  # noqa: E402

NETWORK = ROOT.parent / "shared" / "data" / "network"
TRACES = ROOT.parent / "shared" / "data" / "traces"
RESULTS = ROOT / "bench" / "results" / "route_bench.json"
BOX = (60.166, 60.177, 24.936, 24.952)  # central Helsinki, inside the extract
DEPOT = (60.1702, 24.9401)


def connected_points(car: RoutingEngine, n: int, seed: int) -> np.ndarray:
    """n random (lat, lon) points that reach and are reached from the depot."""
    rng = np.random.default_rng(seed)
    found: list[np.ndarray] = []
    while sum(len(f) for f in found) < n:
        lat = rng.uniform(BOX[0], BOX[1], 200)
        lon = rng.uniform(BOX[2], BOX[3], 200)
        table = car.table(np.r_[DEPOT[0], lat], np.r_[DEPOT[1], lon])
        ok = np.isfinite(table.duration_s[0, 1:]) & np.isfinite(table.duration_s[1:, 0])
        found.append(np.column_stack((lat, lon))[ok])
    return np.concatenate(found)[:n]


def routes_per_second(car: RoutingEngine, points: np.ndarray, threads: int) -> float:
    pairs = [(points[i], points[(i + 7) % len(points)]) for i in range(len(points))]

    def one(pair: tuple[np.ndarray, np.ndarray]) -> None:
        a, b = pair
        car.route(np.array([a[0], b[0]]), np.array([a[1], b[1]]))

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, pairs))
    return len(pairs) / (time.perf_counter() - started)


def bench_routes(
    car: RoutingEngine, points: np.ndarray, data_dir: Path, tmp: Path
) -> dict:
    rows = {
        f"{t} thread{'s' * (t > 1)}": routes_per_second(car, points, t) for t in (1, 2)
    }
    rows["gRPC, 8 in flight"] = asyncio.run(
        rpc_routes_per_second(data_dir, tmp, points, 8)
    )
    print("\nroutes (Helsinki car, with steps and full geometry)")
    for name, rate in rows.items():
        print(f"  {name:<18} {rate:10.0f} routes/s")
    return rows


async def rpc_routes_per_second(
    data_dir: Path, tmp: Path, points: np.ndarray, concurrency: int
) -> float:
    """ComputeRoute calls per second through a real server on 127.0.0.1, port 0
    (client and server share this process and its one event loop)."""
    import grpc
    from tracking.v1 import common_pb2, route_pb2, route_pb2_grpc

    from tracking_grpc.config import Settings
    from tracking_grpc.server import TrackingServer

    settings = Settings(
        listen="127.0.0.1:0",
        data_dir=str(tmp / "store"),
        routing_data_dir=str(data_dir),
    )
    server = await TrackingServer.start(settings)
    try:
        address = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            stub = route_pb2_grpc.RouteStub(channel)
            requests = [
                route_pb2.ComputeRouteRequest(
                    origin=common_pb2.LatLng(lat=a[0], lon=a[1]),
                    destination=common_pb2.LatLng(lat=b[0], lon=b[1]),
                )
                for a, b in zip(points, np.roll(points, 7, axis=0), strict=True)
            ]
            queue = list(requests)

            async def worker() -> None:
                while queue:
                    await stub.ComputeRoute(queue.pop())

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return len(requests) / (time.perf_counter() - started)
    finally:
        await server.stop(0)


def interpreter_share_during(work: Callable[[], object], seconds: float = 1.0) -> float:
    """How fast a pure-Python loop runs while ``work`` repeats in another thread,
    relative to alone: near 1 when the work releases the GIL, near 0 when not."""

    def spin() -> int:
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            count += 1
        return count

    alone = spin()
    stop = threading.Event()

    def repeat() -> None:
        while not stop.is_set():
            work()

    thread = threading.Thread(target=repeat)
    thread.start()
    during = spin()
    stop.set()
    thread.join()
    return during / alone


def bench_gil(car: RoutingEngine, points: np.ndarray) -> dict:
    lat, lon = points[:300, 0], points[:300, 1]
    jobs = [
        optimise.JobSpec(f"j{i}", (float(a), float(b)))
        for i, (a, b) in enumerate(points[:150])
    ]
    van = optimise.VehicleSpec("van", DEPOT, DEPOT)
    problem = optimise.build_problem(car, [van], jobs)
    shares = {
        "osrm_table_300": interpreter_share_during(lambda: car.table(lat, lon)),
        "vroom_solve_150": interpreter_share_during(
            lambda: optimise.solve(problem, exploration_level=5, threads=1)
        ),
    }
    print("\ninterpreter speed while a library call runs in another thread (1 = free)")
    for name, share in shares.items():
        print(f"  {name:<18} {share:5.2f}")
    return shares


def bench_matrix(car: RoutingEngine, points: np.ndarray, sizes: list[int]) -> list:
    rows = []
    print("\nmatrix: one table call against n² single routes")
    print(f"  {'n':>5} {'table ms':>10} {'cells/s':>12} {'n² routes ms':>14}")
    for n in sizes:
        lat, lon = points[:n, 0], points[:n, 1]
        started = time.perf_counter()
        car.table(lat, lon)
        table_ms = (time.perf_counter() - started) * 1e3
        singles_ms = None
        if n <= 30:
            started = time.perf_counter()
            for i in range(n):
                for j in range(n):
                    if i != j:
                        car.route(lat[[i, j]], lon[[i, j]], steps=False)
            singles_ms = (time.perf_counter() - started) * 1e3
        rows.append({"n": n, "table_ms": table_ms, "single_routes_ms": singles_ms})
        shown = f"{singles_ms:14.1f}" if singles_ms is not None else f"{'-':>14}"
        print(f"  {n:>5} {table_ms:10.1f} {n * n / table_ms * 1e3:12.0f} {shown}")
    return rows


def nearest_neighbour_s(problem: optimise.Problem, vehicles: int) -> float:
    """Duration of a plan that splits jobs evenly and visits each nearest-first."""
    depot = problem.vehicle_places[0][0]
    if depot is None:
        raise ValueError("nearest-neighbour split: the first vehicle has no start")
    jobs = list(range(len(problem.jobs)))
    total = 0.0
    for share in np.array_split(np.array(jobs), vehicles):
        left, here = set(share.tolist()), depot
        while left:
            nxt = min(
                left, key=lambda j: problem.duration_s[here, problem.job_places[j]]
            )
            total += problem.duration_s[here, problem.job_places[nxt]]
            here = problem.job_places[nxt]
            left.remove(nxt)
        total += problem.duration_s[here, depot]
    return float(total)


def bench_optimise(car: RoutingEngine, points: np.ndarray, sizes: list[int]) -> list:
    rows = []
    print("\noptimisation: VROOM (effort by size) against a nearest-neighbour split")
    print(
        f"  {'jobs':>5} {'vehicles':>8} {'table ms':>9} {'solve ms':>9} "
        f"{'assigned':>8} {'drive h':>8} {'nn drive h':>10}"
    )
    for n in sizes:
        vehicles = max(2, n // 25)
        jobs = [
            optimise.JobSpec(f"j{i}", (float(a), float(b)), service_s=120, demand=(1,))
            for i, (a, b) in enumerate(points[:n])
        ]
        capacity = (int(np.ceil(n / vehicles)) + 2,)
        fleet = [
            optimise.VehicleSpec(f"v{k}", DEPOT, DEPOT, capacity, (0, 8 * 3600))
            for k in range(vehicles)
        ]
        started = time.perf_counter()
        problem = optimise.build_problem(car, fleet, jobs)
        table_ms = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        plan = optimise.solve(problem, threads=2)
        solve_ms = (time.perf_counter() - started) * 1e3
        drive_h = sum(v.duration_s for v in plan.vehicles) / 3600
        nn_h = nearest_neighbour_s(problem, vehicles) / 3600
        assigned = n - len(plan.unassigned)
        rows.append(
            {
                "jobs": n,
                "vehicles": vehicles,
                "table_ms": table_ms,
                "solve_ms": solve_ms,
                "assigned": assigned,
                "drive_h": drive_h,
                "nearest_neighbour_drive_h": nn_h,
            }
        )
        print(
            f"  {n:>5} {vehicles:>8} {table_ms:9.0f} {solve_ms:9.0f} "
            f"{assigned:>8} {drive_h:8.2f} {nn_h:10.2f}"
        )
    return rows


def bench_monitor(car: RoutingEngine, points: np.ndarray, devices: list[int]) -> list:
    routes = []
    for k in range(20):
        a, b = points[k], points[k + 20]
        route = car.route(np.array([a[0], b[0]]), np.array([a[1], b[1]]), steps=False)
        routes.append(route)
    rows = []
    print("\nroute monitoring: all devices per round against one device at a time")
    print(f"  {'devices':>7} {'fixes':>8} {'arrays fixes/s':>15} {'one device':>12}")
    for n in devices:
        monitor = RouteMonitor()
        drives = []
        started = time.perf_counter()
        for d in range(n):
            route = routes[d % len(routes)]
            name = f"dev-{d}"
            monitor.assign(
                PlannedRoute(
                    "t", name, "r", route.lat, route.lon, route.segment_duration_s, 0
                )
            )
            points_d, _ = support.drive(route.lat, route.lon, 9.0 + d % 5)
            drives.append(support.fixes(name, points_d[:40], tenant="t", start_ms=1))
        monitor.progress("t", "dev-0")  # builds the flat arrays of every route
        assign_ms = (time.perf_counter() - started) * 1e3
        print(f"  ({n} routes assigned and drives made in {assign_ms:.0f} ms)")
        # Ten rounds of batches: each batch holds the next 4 fixes of every device.
        batches = [
            FixBatch.concat(
                [b.take(np.arange(r * 4, min(r * 4 + 4, len(b)))) for b in drives]
            )
            for r in range(10)
        ]
        fixes = sum(len(b) for b in batches)
        started = time.perf_counter()
        for batch in batches:
            monitor.evaluate(batch, 0)
        arrays = fixes / (time.perf_counter() - started)
        per_device = None
        if n <= 1000:
            single = RouteMonitor()
            for d in range(n):
                route = routes[d % len(routes)]
                single.assign(
                    PlannedRoute(
                        "t",
                        f"dev-{d}",
                        "r",
                        route.lat,
                        route.lon,
                        route.segment_duration_s,
                        0,
                    )
                )
            per_batch = [
                [b.take(np.flatnonzero(b.device == f"dev-{d}")) for d in range(n)]
                for b in batches
            ]
            started = time.perf_counter()
            for pieces in per_batch:
                for piece in pieces:
                    single.evaluate(piece, 0)
            per_device = fixes / (time.perf_counter() - started)
        rows.append(
            {
                "devices": n,
                "fixes": fixes,
                "arrays_fixes_per_s": arrays,
                "per_device_fixes_per_s": per_device,
            }
        )
        shown = f"{per_device:12.0f}" if per_device else f"{'-':>12}"
        print(f"  {n:>7} {fixes:>8} {arrays:15.0f} {shown}")
    return rows


def bench_porto(porto_dir: Path) -> dict:
    car = Router.load(str(porto_dir)).engine("car")
    trips = porto.trips_inside(TRACES / "porto_taxi_test320.csv")
    matched = []
    shares, confidences = [], []
    started = time.perf_counter()
    for trip in trips:
        radius = np.full(len(trip.lat), 2 * porto.ACCURACY_M)
        match = car.match(trip.lat, trip.lon, trip.time_ms // 1000, radius)
        shares.append(match.matched.mean())
        if match.matchings:
            weights = np.array([m.distance_m for m in match.matchings])
            conf = np.array([m.confidence for m in match.matchings])
            confidences.append(float((weights * conf).sum() / max(weights.sum(), 1e-9)))
        matched.append((trip, match))
    match_ms = (time.perf_counter() - started) * 1e3 / len(trips)
    timed = []
    for trip, match in matched:
        idx = np.flatnonzero(match.matched)
        duration_s = (
            (trip.time_ms[idx[-1]] - trip.time_ms[idx[0]]) / 1000 if len(idx) else 0
        )
        if len(match.matchings) == 1 and duration_s >= 60:
            timed.append((trip, match, idx, duration_s))
    actual, before, after = [], [], []
    for fold in (0, 1):
        model = TravelTimeModel()
        for trip, match, _, _ in timed[fold::2]:
            model.observe_match(match, trip.time_ms / 1000)
        for _trip, match, idx, duration_s in timed[1 - fold :: 2]:
            route = car.route(
                match.lat[idx[[0, -1]]], match.lon[idx[[0, -1]]], steps=False
            )
            actual.append(duration_s)
            before.append(route.duration_s)
            after.append(model.expected_duration_s(route))
    errors = porto.eta_errors(np.array(actual), np.array(before), np.array(after))
    learned_all = TravelTimeModel()
    for trip, match, _, _ in timed:
        learned_all.observe_match(match, trip.time_ms / 1000)
    result = {
        "trips_inside": len(trips),
        "trips_matched": sum(bool(m.matchings) for _, m in matched),
        "mean_share_matched": float(np.mean(shares)),
        "median_confidence": float(np.median(confidences)),
        "mean_confidence": float(np.mean(confidences)),
        "match_ms_per_trip": match_ms,
        "eta_trips": len(actual),
        "eta_errors": errors,
        "learned_factor_all_trips": learned_all.global_factor,
    }
    print("\nPorto taxi trips inside porto_centre (map matching, ETA two-fold)")
    print(
        f"  trips {result['trips_inside']}, matched {result['trips_matched']}, "
        f"share of fixes matched {result['mean_share_matched']:.2f}, confidence "
        f"median {result['median_confidence']:.2f} mean {result['mean_confidence']:.2f}"
    )
    print(f"  {'ETA':<7} {'MAE s':>7} {'median AE s':>12} {'MAPE':>6} {'real/ETA':>9}")
    for name, e in errors.items():
        print(
            f"  {name:<7} {e['mean_abs_s']:7.0f} {e['median_abs_s']:12.0f} "
            f"{e['mape']:6.2f} {e['median_ratio']:9.2f}"
        )
    print(
        f"  learned factor over all {len(timed)} timed trips: "
        f"{result['learned_factor_all_trips']:.2f}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        helsinki_dir, porto_dir = Path(tmp) / "helsinki", Path(tmp) / "porto"
        datasets.prepare(
            NETWORK / "helsinki.osm.pbf",
            helsinki_dir,
            ("car",),
            small_component_size=50,
        )
        datasets.prepare(
            NETWORK / "porto_centre.osm.pbf",
            porto_dir,
            ("car",),
            small_component_size=50,
        )
        prepare_s = time.perf_counter() - started
        print(f"prepared Helsinki and Porto car datasets in {prepare_s:.2f} s")
        car = Router.load(str(helsinki_dir)).engine("car")
        points = connected_points(car, 1000, seed=1)
        results = {
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "load_average_at_start": os.getloadavg(),
            },
            "prepare_s": prepare_s,
            "routes_per_s": bench_routes(
                car, points[: 300 if args.quick else 1000], helsinki_dir, Path(tmp)
            ),
            "interpreter_share_during_call": bench_gil(car, points),
            "matrix": bench_matrix(
                car, points, [10, 30, 100] if args.quick else [10, 30, 100, 300, 1000]
            ),
            "optimise": bench_optimise(
                car, points, [50, 200] if args.quick else [50, 200, 1000]
            ),
            "monitor": bench_monitor(
                car, points, [100, 1000] if args.quick else [100, 1000, 10_000]
            ),
            "porto": bench_porto(porto_dir),
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
