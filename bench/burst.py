"""Responsiveness under an ingest burst: how long other calls wait while a server
stores and processes a flood of PublishBatch fixes.

Starts a server on 127.0.0.1 (embedded, or PostgreSQL + Redis with
``--production``), loads polygon fences, then sends ``--fixes`` fixes in batches
of ``--batch`` over ``--concurrency`` calls at once, as fast as the server takes
them. Meanwhile a prober sends a health check every 50 ms, and the same to a peer:
a bare grpc.aio server in a process of its own, which does no work, so that its
answers show what the busy machine alone costs. The table gives both, idle,
during the burst and after it (while the processors catch up), and the time a
SIGTERM then takes. JSON goes to bench/results/burst_<name>.json.

    .venv/bin/python bench/burst.py --production --fixes 900000 --batch 10000 \\
        --concurrency 8 --move-m 30 --name gateways
    .venv/bin/python bench/burst.py --production --one-device --fixes 100000 \\
        --batch 1000 --concurrency 1 --name backlog
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "generated")]

from load import RESULTS, SpawnedServer, free_port, wait_serving  # noqa: E402
from load_backends import Production  # noqa: E402
from tracking.v1 import (  # noqa: E402
    common_pb2,
    geofence_pb2,
    geofence_pb2_grpc,
    track_pb2,
    track_pb2_grpc,
)

from tracking_grpc.loadgen.fences import polygon_features  # noqa: E402

CENTER = (52.52, 13.40)
SPREAD_DEG = 0.05
M_PER_DEG = 111_195.0
PROBE_S = 0.05
PEER = """
import asyncio, sys, grpc
from grpc_health.v1 import health, health_pb2_grpc
async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(sys.argv[1])
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


class Prober(threading.Thread):
    """Health checks every ``PROBE_S``; each answer's latency under the phase."""

    def __init__(self, target: str, phase: list[str]) -> None:
        super().__init__(daemon=True)
        self.target, self.phase = target, phase
        self.samples: dict[str, list[float]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                phase, started = self.phase[0], time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                    took = (time.perf_counter() - started) * 1000
                except grpc.RpcError:
                    took = float("nan")  # counted, never hidden
                self.samples.setdefault(phase, []).append(took)
                time.sleep(PROBE_S)


class Burst:
    """The fixes: ``devices`` devices round robin, or one device's long backlog."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = np.random.default_rng(1)
        n = 1 if args.one_device else args.devices
        self.ids = np.array([f"burst-{i:06d}" for i in range(n)], dtype=object)
        self.lat = CENTER[0] + self.rng.uniform(-SPREAD_DEG, SPREAD_DEG, n)
        self.lon = CENTER[1] + self.rng.uniform(-SPREAD_DEG, SPREAD_DEG, n)
        self.seq = np.zeros(n, dtype=np.int64)
        # Fix times step 5 s per device (1 s for one device), ending before now.
        step_s = 1 if args.one_device else 5
        per_device = -(-args.fixes // n)
        self.start_ms = int(time.time() * 1000) - (per_device + 60) * step_s * 1000
        self.step_ms = step_s * 1000
        self.cursor = self.sent = self.stored = 0
        self.latencies_ms: list[float] = []

    def next_request(self) -> track_pb2.PublishBatchRequest | None:
        size = min(self.args.batch, self.args.fixes - self.sent)
        if size <= 0:
            return None
        self.sent += size
        if self.args.one_device:
            rows = np.zeros(size, dtype=np.intp)
            seq = self.seq[0] + 1 + np.arange(size)
            self.seq[0] += size
        else:
            rows = (self.cursor + np.arange(size)) % self.ids.size
            self.cursor = int(rows[-1]) + 1
            self.seq[rows] += 1
            seq = self.seq[rows]
        lat, lon = self._walk(rows)
        columns = track_pb2.ColumnarFixes(
            device_ids=self.ids[rows].tolist(),
            device_index=range(size),
            seq=seq.tolist(),
            time_ms=(self.start_ms + seq * self.step_ms).tolist(),
            lat=lat.tolist(),
            lon=lon.tolist(),
            provider=[common_pb2.PROVIDER_GNSS] * size,
        )
        return track_pb2.PublishBatchRequest(columns=columns)

    def _walk(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions after a random step of ``move_m`` per fix (one device: its
        fixes one after another)."""
        step = self.args.move_m / M_PER_DEG
        north = self.rng.normal(0.0, step, rows.size)
        east = self.rng.normal(0.0, step, rows.size) / np.cos(np.radians(CENTER[0]))
        if self.args.one_device:
            lat = self.lat[0] + np.cumsum(north)
            lon = self.lon[0] + np.cumsum(east)
            self.lat[0], self.lon[0] = lat[-1], lon[-1]
            return lat, lon
        self.lat[rows] += north
        self.lon[rows] += east
        return self.lat[rows], self.lon[rows]

    async def send(self, target: str) -> float:
        """Sends every fix; the seconds it took."""
        options = [("grpc.max_send_message_length", 256 << 20)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            stub = track_pb2_grpc.TrackSessionStub(channel)
            started = time.perf_counter()
            await asyncio.gather(
                *(self._caller(stub) for _ in range(self.args.concurrency))
            )
            return time.perf_counter() - started

    async def _caller(self, stub: track_pb2_grpc.TrackSessionStub) -> None:
        while (request := self.next_request()) is not None:
            started = time.perf_counter()
            answer = await stub.PublishBatch(request, timeout=600)
            self.latencies_ms.append((time.perf_counter() - started) * 1000)
            self.stored += answer.stored
            if answer.rejected:
                raise SystemExit(f"{answer.rejected} fixes rejected: {answer}")


def import_fences(target: str, count: int) -> int:
    """``count`` polygon fences where the devices roam; how many were made."""
    if count == 0:
        return 0
    collection = polygon_features(count, CENTER, SPREAD_DEG)
    with grpc.insecure_channel(target) as channel:
        stub = geofence_pb2_grpc.GeofenceStub(channel)
        request = geofence_pb2.ImportFencesRequest(geojson=collection, repair=True)
        answer = stub.ImportFences(request, timeout=120)
    return int(answer.created + answer.replaced)


def summary(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {}
    failed = int(np.isnan(v).sum())
    ok = v[~np.isnan(v)]
    quantiles = {"p50_ms": 50, "p90_ms": 90, "p99_ms": 99, "max_ms": 100}
    out = {k: round(float(np.percentile(ok, q)), 1) for k, q in quantiles.items()}
    return {"count": int(v.size), "failed": failed, **out}


def run(args: argparse.Namespace) -> dict:
    production = None
    peer = peer_target = None
    with tempfile.TemporaryDirectory(prefix="tracking-burst-") as tmp:
        try:
            if args.production:
                production = Production(args.pg_admin_url, args.redis_url)
            server = SpawnedServer(Path(tmp), production.flags if production else [])
            peer_target = f"127.0.0.1:{free_port()}"
            peer = subprocess.Popen([sys.executable, "-c", PEER, peer_target])
            wait_serving(peer_target, peer)
            try:
                fences = import_fences(server.target, args.fences)
                phase = ["idle"]
                probers = [Prober(server.target, phase), Prober(peer_target, phase)]
                for prober in probers:
                    prober.start()
                time.sleep(args.idle_s)
                phase[0] = "burst"
                burst = Burst(args)
                seconds = asyncio.run(burst.send(server.target))
                phase[0] = "after"
                time.sleep(args.after_s)
                for prober in probers:
                    prober.stop.set()
                    prober.join()
                stopping = time.perf_counter()
                exit_code = server.stop()
                stop_s = time.perf_counter() - stopping
            finally:
                server.stop()
        finally:
            if peer is not None:
                peer.kill()
                peer.wait()
            if production is not None:
                production.close()
    return {
        "name": args.name,
        "args": vars(args),
        "fences": fences,
        "burst_s": round(seconds, 2),
        "fixes_per_s": round(args.fixes / seconds),
        "stored": burst.stored,
        "batch": summary(burst.latencies_ms),
        "stop_s": round(stop_s, 2),
        "server_exit_code": exit_code,
        "health": {p: summary(v) for p, v in probers[0].samples.items()},
        "peer_health": {p: summary(v) for p, v in probers[1].samples.items()},
    }


def print_table(out: dict) -> None:
    print(
        f"burst: {out['args']['fixes']:,} fixes in {out['burst_s']} s "
        f"({out['fixes_per_s']:,}/s); batch p50 {out['batch']['p50_ms']} ms, "
        f"p99 {out['batch']['p99_ms']} ms; stop took {out['stop_s']} s"
    )
    print(f"{'health check (ms)':<22}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}  failed")
    for phase in ("idle", "burst", "after"):
        for who, key in (("tracking", "health"), ("bare grpc.aio", "peer_health")):
            s = out[key].get(phase)
            if s:
                row = "".join(f"{s[k]:>8}" for k in ("p50_ms", "p90_ms", "p99_ms"))
                print(f"{phase + ' ' + who:<22}{row}{s['max_ms']:>8}  {s['failed']}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--name", default="run", help="results go to bench/results/burst_<name>.json")
    add("--fixes", type=int, default=300_000)
    add("--batch", type=int, default=10_000, help="fixes per PublishBatch")
    add("--concurrency", type=int, default=8, help="PublishBatch calls at once")
    add("--devices", type=int, default=50_000)
    add("--one-device", action="store_true", help="one device's long backlog")
    add("--move-m", type=float, default=30.0, help="random step per fix, metres")
    add("--fences", type=int, default=1000)
    add("--idle-s", type=float, default=3.0)
    add("--after-s", type=float, default=30.0, help="probing after the burst")
    add("--production", action="store_true", help="PostgreSQL + Redis backends")
    add("--json", type=Path, help="write the JSON here instead")
    add("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    add("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    if args.fixes <= 0 or args.batch <= 0 or args.concurrency <= 0:
        parser.error("--fixes, --batch and --concurrency must be positive")
    if not args.one_device and args.batch > args.devices:
        parser.error("a batch carries each device at most once: --batch > --devices")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    out = run(args)
    print_table(out)
    path = args.json or RESULTS / f"burst_{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
