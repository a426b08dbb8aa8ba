"""Load, latency and scale: simulated devices, gateways and watchers against a server.

Starts a server on 127.0.0.1 (or uses ``--target`` with ``--server-pid``), runs driver
processes that open one Track stream per device and send fixes on an open-loop
schedule (and/or gateways sending columnar PublishBatch calls), measures in-band
latency (fix sent -> ack, fix time -> watcher update), server CPU and memory per open
stream, and prints a ghz-like summary. JSON goes to bench/results/load_<name>.json.

    .venv/bin/python bench/load.py --devices 10000 --interval-s 5 --ramp-s 20 \
        --steady-s 60 --drivers 3 --watchers 1 --name streams_10k
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "generated")]

from load_backends import (  # noqa: E402
    STORED_PER_DEVICE,
    BackendMeter,
    PrivateRedisCluster,
    Production,
)
from load_faults import Target as FaultTarget  # noqa: E402
from load_faults import plan_faults  # noqa: E402
from tracking.v1 import geofence_pb2, geofence_pb2_grpc  # noqa: E402

from tracking_grpc.loadgen import (  # noqa: E402
    driver,
    fences,
    procstat,
    sockets,
    stalls,
    stats,
)
from tracking_grpc.loadgen.node import (  # noqa: E402
    NodeDriver,
    NodeDriverError,
    check_installed,
)
from tracking_grpc.loadgen.plan import (  # noqa: E402
    DriverResult,
    Plan,
    Storm,
    WatcherReport,
    Window,
)

RESULTS = ROOT / "bench" / "results"
MAX_RUN_S = 180.0  # every run is bounded: ramp + settle + steady at most 3 min
PY_SPY = Path(sys.executable).parent / "py-spy"  # for --profile (pip install py-spy)


def on_this_machine(url: str) -> bool:
    """Whether a PostgreSQL or Redis URL names loopback or a Unix socket."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return True
    host = unquote(parts.hostname or "")
    return host in ("127.0.0.1", "localhost") or host.startswith("/")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(
    target: str, process: subprocess.Popen | None = None, timeout_s: float = 60.0
) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.time() + timeout_s
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                if time.time() > deadline:
                    raise
            time.sleep(0.2)


def _on_cpus(cpus: tuple[int, ...]) -> list[str]:
    """The prefix of a command that keeps its process, and every thread it starts,
    on ``cpus`` (``taskset``: no code runs between fork and exec in this process,
    which has threads of its own)."""
    return ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []


class EchoPeer:
    """``bench/echo_peer.py`` (a bare grpc.aio server) in a child process."""

    def __init__(self, data_dir: Path, cpus: tuple[int, ...] = ()) -> None:
        self.target = f"127.0.0.1:{free_port()}"
        self.log = open(data_dir / "peer.log", "w")
        command = [sys.executable, str(ROOT / "bench" / "echo_peer.py")]
        self.process = subprocess.Popen(
            [*_on_cpus(cpus), *command, "--listen", self.target],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_serving(self.target, self.process)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class SpawnedServer:
    """``tracking serve`` in a child process, on a free loopback port."""

    def __init__(
        self, data_dir: Path, flags: list[str], cpus: tuple[int, ...] = ()
    ) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.data_dir = data_dir
        command = [
            sys.executable,
            "-m",
            "tracking_grpc",
            "serve",
            "--listen",
            self.target,
            "--data-dir",
            str(data_dir),
            "--log-level",
            "WARNING",
            *flags,
        ]
        # The server's own stalls (GC pauses, loop lag) come from its /metrics.
        self.metrics_url: str | None = None
        if not any(f.startswith("--metrics-listen") for f in flags):
            metrics_listen = f"127.0.0.1:{free_port()}"
            command.append(f"--metrics-listen={metrics_listen}")
            self.metrics_url = f"http://{metrics_listen}/metrics"
        self.log = open(data_dir / "server.log", "w")
        self.process = subprocess.Popen(
            [*_on_cpus(cpus), *command],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_serving(self.target, self.process)
        except BaseException:
            self.stop()
            print(*(data_dir / "server.log").read_text().splitlines()[-20:], sep="\n")
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int:
        """SIGTERM (a graceful drain), SIGKILL after a minute; safe to call twice."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return int(self.process.returncode)


def import_fences(target: str, count: int, plan: Plan) -> int:
    """Create ``count`` polygon fences where the devices roam; returns how many."""
    collection = fences.polygon_features(count, plan.center, plan.spread_deg)
    with grpc.insecure_channel(target) as channel:
        stub = geofence_pb2_grpc.GeofenceStub(channel)
        request = geofence_pb2.ImportFencesRequest(geojson=collection, repair=True)
        answer = stub.ImportFences(request, timeout=120)
    return int(answer.created + answer.replaced)


def machine_busy_s() -> float:
    """CPU seconds spent by every process of the machine (noise from others)."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in first]
    idle = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle) / procstat.TICKS_PER_S


def _cpu_list(text: str) -> tuple[int, ...]:
    """``0,1`` as (0, 1): CPUs this machine has."""
    try:
        cpus = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a list of CPU numbers: {text!r}"
        ) from None
    if not cpus or not set(cpus) <= os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError(
            f"CPUs {text!r}: this machine has {sorted(os.sched_getaffinity(0))}"
        )
    return cpus


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def build_plans(args: argparse.Namespace, target: str) -> list[Plan]:
    start_s = time.time() + 2.0 + args.drivers * 0.5  # time for the drivers to start
    window = Window(start_s, args.ramp_s, args.steady_s, args.settle_s)
    storm = None
    if args.storm:
        storm = Storm(window.steady_start_s + args.storm_at_s, args.storm_spread_s)
        window = replace(window, steady_s=args.steady_s)
    base = Plan(
        target=target,
        window=window,
        device_interval_s=args.interval_s,
        streams_per_channel=args.streams_per_channel,
        gateway_devices=args.gateway_devices,
        gateway_batch_fixes=args.gateway_batch,
        gateway_rate_per_s=args.gateway_rate,
        want_events=args.want_events,
        storm=storm,
        nice=args.driver_nice,
        cpus=args.driver_cpus,
        node_options=tuple(args.node_option),
        run=args.run_tag,
    )
    devices = split(args.devices, args.drivers)
    gateways = split(args.gateways, args.drivers)
    plans = [
        replace(base, index=i, devices=devices[i], gateways=gateways[i])
        for i in range(args.drivers)
    ]
    # Watchers get a driver of their own, so device load does not delay their reads.
    if args.watchers:
        plans.append(replace(base, index=len(plans), watchers=args.watchers))
    return plans


def watch_ids(args: argparse.Namespace) -> list[str]:
    if not args.watch_devices:
        return []
    if not args.devices:  # gateways only: watch some of the first gateway's devices
        every = max(1, args.gateway_devices // args.watch_devices)
        numbers = range(0, args.gateway_devices, every)
        first = driver.gateway_name(Plan("", Window(0, 0, 0), run=args.run_tag), 0)
        return [f"{first}-{i:06d}" for i in numbers][: args.watch_devices]
    every = max(1, args.devices // args.watch_devices)
    per = split(args.devices, args.drivers)
    ids = [
        driver.device_id(Plan("", Window(0, 0, 0), index=d, run=args.run_tag), i)
        for d in range(args.drivers)
        for i in range(0, per[d], every)
    ]
    return ids[: args.watch_devices]


def measure_idle(
    server_pid: int,
    production: Production | None,
    idle_s: float,
    observer_pid: int | None = None,
) -> dict:
    """Server and backend CPU with the server up, fences loaded and no load yet."""
    if idle_s <= 0:
        return {}
    meter = BackendMeter(production)
    before = procstat.usage(server_pid)
    observed = procstat.usage(observer_pid).cpu_s if observer_pid else 0.0
    time.sleep(idle_s)
    after = procstat.usage(server_pid)
    backend, _ = meter.elapsed()
    observer = procstat.usage(observer_pid).cpu_s - observed if observer_pid else None
    return {
        "observer_cores": None if observer is None else round(observer / idle_s, 4),
        "seconds": idle_s,
        "server_cores": round((after.cpu_s - before.cpu_s) / idle_s, 4),
        "server_processes": after.processes,
        "rss_mb": round(after.rss_bytes / 2**20, 1),
        "backend_cores": {n: round(v / idle_s, 4) for n, v in backend.items()},
    }


def assign_drivers(
    plans: list[Plan], device_driver: str
) -> tuple[list[Plan], list[Plan]]:
    """Plans for Python driver processes and for node processes: with ``node``, the
    device streams of each plan go to node, its gateways and watchers stay in
    Python."""
    if device_driver == "python":
        return plans, []
    python, node = [], []
    for plan in plans:
        if not plan.devices:
            python.append(plan)
            continue
        node.append(replace(plan, gateways=0, watchers=0))
        if plan.gateways or plan.watchers:
            python.append(replace(plan, devices=0))
    return python, node


def run_drivers(
    plans: list[Plan],
    ids: list[str],
    server_pid: int,
    args: argparse.Namespace,
    production: Production | None = None,
    observer_pid: int | None = None,
    metrics_url: str | None = None,
) -> tuple[list[DriverResult], dict]:
    """Start the driver processes, sample the server during the run, collect."""
    python_plans, node_plans = assign_drivers(plans, args.device_driver)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=driver.run, args=(plan, ids, queue), daemon=True)
        for plan in python_plans
    ]
    for process in processes:
        process.start()
    faults = plan_faults(
        args,
        FaultTarget(
            server_pid,
            port_of(plans[0].target),
            cluster_of(production),
            production.postgres if production is not None else None,
        ),
        watcher_pid(python_plans, processes),
    )
    nodes: list[NodeDriver] = []
    try:
        nodes += [NodeDriver(plan) for plan in node_plans]
        faults.start(plans[0].window.steady_start_s)
        results, samples = _sample_and_collect(
            plans,
            processes,
            nodes,
            queue,
            server_pid,
            args,
            production,
            observer_pid,
            metrics_url,
        )
    finally:
        for node in nodes:
            node.kill()
    if faults:
        samples["faults"] = faults.join()
    return results, samples


def port_of(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


def cluster_of(production: Production | None) -> PrivateRedisCluster | None:
    return production.cluster if production is not None else None


def watcher_pid(
    plans: list[Plan], processes: Sequence[multiprocessing.process.BaseProcess]
) -> int | None:
    """The driver process that runs the watchers, if any."""
    for plan, process in zip(plans, processes, strict=True):
        if plan.watchers:
            return started_pid(process)
    return None


def started_pid(process: multiprocessing.process.BaseProcess) -> int:
    """The process id of a started driver process."""
    if process.pid is None:
        raise RuntimeError(f"driver process {process.name} was never started")
    return process.pid


def _sample_and_collect(
    plans: list[Plan],
    processes: Sequence[multiprocessing.process.BaseProcess],
    nodes: list[NodeDriver],
    queue: multiprocessing.queues.Queue,
    server_pid: int,
    args: argparse.Namespace,
    production: Production | None,
    observer_pid: int | None,
    metrics_url: str | None,
) -> tuple[list[DriverResult], dict]:
    driver_pids = [started_pid(p) for p in processes] + [n.pid for n in nodes]
    window = plans[0].window
    base = procstat.usage(server_pid)
    time.sleep(max(0.0, window.start_s - time.time()))
    profiler = None
    samples: dict = {"rss_baseline_bytes": base.rss_bytes}
    time.sleep(max(0.0, window.steady_start_s - time.time()))
    steady = procstat.usage(server_pid)
    members = procstat.MemberCpu(server_pid)
    port = port_of(plans[0].target)
    observed = procstat.usage(observer_pid) if observer_pid else None
    samples["server_process_pids"] = members.members
    samples["server_process_connections"] = sockets.held_by_each(members.members, port)
    drivers_cpu = [procstat.usage(pid).cpu_s for pid in driver_pids]
    busy = machine_busy_s()
    meter = BackendMeter(production)
    runtime = stalls.snapshot(metrics_url) if metrics_url else None
    if args.profile:
        profiler = start_profiler(
            server_pid, args.profile, window.steady_s, args.profile_native
        )
    rss_max = steady.rss_bytes
    while time.time() < window.end_s:
        time.sleep(min(1.0, max(0.0, window.end_s - time.time())))
        rss_max = max(rss_max, procstat.usage(server_pid).rss_bytes)
        members.sample()
    end = procstat.usage(server_pid)
    if metrics_url and runtime is not None:
        samples["stalls"] = stalls.between(runtime, stalls.snapshot(metrics_url))
    if observer_pid and observed is not None:
        samples["observer_cpu_s"] = procstat.usage(observer_pid).cpu_s - observed.cpu_s
    # Python driver processes first (watchers last among them), then node ones.
    samples["driver_process_cpu_s"] = [
        procstat.usage(pid).cpu_s - before
        for pid, before in zip(driver_pids, drivers_cpu, strict=True)
    ]
    samples["drivers_cpu_s"] = sum(samples["driver_process_cpu_s"])
    samples["machine_busy_s"] = machine_busy_s() - busy
    samples["backend_cpu_s"], samples["redis_shard_cpu_s"] = meter.elapsed()
    samples["backend_exact"] = meter.exact
    # A worker killed in the window counts up to its last sample (once a second).
    samples["server_processes_gone"] = members.gone()
    samples["server_cpu_s"] = end.cpu_s - steady.cpu_s + members.gone_cpu_s()
    # Each process of the server (supervisor first, then workers): the split of work.
    samples["server_process_cpu_s"] = members.elapsed()
    samples["server_processes"] = end.processes
    samples["rss_steady_max_bytes"] = rss_max
    samples["rss_steady_end_bytes"] = end.rss_bytes
    results = [queue.get(timeout=window.end_s + 120 - time.time()) for _ in processes]
    results += [node.result(window.end_s + 120 - time.time()) for node in nodes]
    for process in processes:
        process.join(timeout=30)
    if profiler is not None:
        profiler.wait(timeout=60)
    return results, samples


def start_profiler(
    pid: int, path: str, duration_s: float, native: bool = False
) -> subprocess.Popen:
    kind = "raw" if path.endswith(".txt") else "flamegraph"
    command = [str(PY_SPY), "record", "-p", str(pid), "-d", str(int(duration_s))]
    command += ["-o", path, "-f", kind, "-r", "200"]
    # C frames too (gRPC core, uvloop, numpy) need py-spy to pause the process for
    # each sample, which slows it; without them it samples without pausing.
    command.append("--native" if native else "--nonblocking")
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )


def sqlite_stored(data_dir: Path) -> list[tuple[str, int, int]]:
    with sqlite3.connect(data_dir / "history.sqlite3") as conn:
        return conn.execute(STORED_PER_DEVICE).fetchall()


def verify(rows: list[tuple[str, int, int]], results: list[DriverResult]) -> dict:
    """After the server stopped: is every fix a device generated stored once, and
    every fix acked stored?

    Device streams are checked device by device. Gateways keep no list per device
    (a failed call is not resent); their fixes are checked in total: every row of
    a device no stream drove is a gateway's, and the store keeps at most one row
    per device and seq, so as many rows as gateway fixes sent means each stored
    once."""
    stored = {device: (count, top) for device, count, top in rows}
    generated = {d: n for r in results for d, n, _ in r.generated}
    acked = {d: a for r in results for d, _, a in r.generated}
    lost = sum(n - stored.get(d, (0, 0))[0] for d, n in generated.items())
    # Seqs run 1..n: an acked seq is missing when fewer rows than it are stored.
    acked_lost = sum(max(a - stored.get(d, (0, 0))[0], 0) for d, a in acked.items())
    gaps = sum(1 for d, n in generated.items() if stored.get(d, (0, 0)) != (n, n))
    everything = sum(r.counts.get("fixes_generated", 0) for r in results)
    gateway_sent = everything - sum(generated.values())
    gateway_rows = sum(c for d, (c, _) in stored.items() if d not in generated)
    return {
        "rows_stored_all_devices": sum(count for count, _ in stored.values()),
        "devices_checked": len(generated),
        "fixes_generated": sum(generated.values()),
        "fixes_stored_rows": sum(stored.get(d, (0, 0))[0] for d in generated),
        "fixes_lost": lost,
        # Of those, acked ones (an ack means stored: must be 0). The rest were
        # never acked: sent after the server stopped taking them, or never sent.
        "fixes_acked_not_stored": acked_lost,
        "devices_with_gaps_or_extra": gaps,
        "gateway_fixes_sent": gateway_sent,
        "gateway_fixes_stored_rows": gateway_rows,
        "gateway_fixes_missing": gateway_sent - gateway_rows,
    }


def report(
    args: argparse.Namespace,
    plans: list[Plan],
    results: list[DriverResult],
    samples: dict,
) -> dict:
    steady_s = plans[0].window.steady_s
    streams = sum(r.streams_open_max for r in results)
    counts = stats.merge_counts(r.counts for r in results)
    errors = stats.merge_counts(r.errors for r in results)
    fixes_in_window = len(stats.merge(r.ack_ms for r in results)) + counts.get(
        "window_fixes_stored", 0
    )
    cpu_s = samples["server_cpu_s"]
    rss_growth = samples["rss_steady_max_bytes"] - samples["rss_baseline_bytes"]
    out = {
        "name": args.name,
        "args": vars(args),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "streams_open": streams,
        "ack": stats.summarize(stats.merge(r.ack_ms for r in results), steady_s),
        "ack_from_schedule": stats.summarize(
            stats.merge(r.ack_sched_ms for r in results), steady_s
        ),
        "send_lag": stats.summarize(
            stats.merge(r.send_lag_ms for r in results), steady_s
        ),
        "watch": stats.summarize(stats.merge(r.watch_ms for r in results), steady_s),
        "batch": stats.summarize(stats.merge(r.batch_ms for r in results), steady_s),
        "counts": counts,
        "errors": errors,
        "error_details": {k: v for r in results for k, v in r.error_details.items()},
        "server": {
            "processes": samples["server_processes"],
            "cpu_cores": round(cpu_s / steady_s, 3),
            "cpu_us_per_fix": round(cpu_s / fixes_in_window * 1e6, 1)
            if fixes_in_window
            else None,
            "process_cpu_cores": [
                round(v / steady_s, 3) for v in samples["server_process_cpu_s"]
            ],
            "process_connections": samples["server_process_connections"],
            "process_pids": samples["server_process_pids"],
            "processes_gone": samples["server_processes_gone"],
            "rss_baseline_mb": round(samples["rss_baseline_bytes"] / 2**20, 1),
            "rss_steady_mb": round(samples["rss_steady_max_bytes"] / 2**20, 1),
            "rss_kb_per_stream": round(rss_growth / streams / 1024, 1)
            if streams
            else None,
            "stalls": samples.get("stalls"),
        },
        "device_driver": args.device_driver,
        "drivers_cpu_cores": round(samples["drivers_cpu_s"] / steady_s, 3),
        "driver_process_cpu_cores": [
            round(v / steady_s, 3) for v in samples["driver_process_cpu_s"]
        ],
        "machine_busy_cores": round(samples["machine_busy_s"] / steady_s, 3),
        "backend_cpu_cores": {
            n: round(v / steady_s, 3) for n, v in samples["backend_cpu_s"].items()
        },
        # exact: a private server measured by its own processes; otherwise every
        # process of that name on the machine (an upper bound).
        "backend_exact": samples["backend_exact"],
        "backend_us_per_fix": {
            n: round(v / fixes_in_window * 1e6, 1) if fixes_in_window else None
            for n, v in samples["backend_cpu_s"].items()
        },
        "redis_shard_cpu_cores": [
            round(v / steady_s, 3) for v in samples["redis_shard_cpu_s"]
        ],
        # The machine's CPU outside this run's server, drivers, backends and
        # observer: other programs sharing the cores, and kernel work charged to
        # no process (writeback of PostgreSQL's writes, for one).
        "other_work_cores": round(
            (
                samples["machine_busy_s"]
                - cpu_s
                - samples["drivers_cpu_s"]
                - sum(samples["backend_cpu_s"].values())
                - samples.get("observer_cpu_s", 0.0)
            )
            / steady_s,
            3,
        ),
        "fixes_in_window": fixes_in_window,
    }
    if "observer_cpu_s" in samples:
        # A server process with no clients on the same backends: what every
        # process pays for receiving the fleet's live updates (plus its idle cost).
        observer_s = samples["observer_cpu_s"]
        out["observer"] = {
            "cpu_cores": round(observer_s / steady_s, 4),
            "cpu_us_per_fleet_fix": round(observer_s / fixes_in_window * 1e6, 2)
            if fixes_in_window
            else None,
        }
    if any(r.reconnected_s for r in results):
        reconnected = stats.merge(r.reconnected_s for r in results)
        recovered = stats.merge(r.recovered_s for r in results)
        out["storm"] = {
            "devices_resumed": int(reconnected.size),
            "all_reconnected_s": round(float(reconnected.max()), 2),
            "all_recovered_s": round(float(recovered.max()), 2)
            if recovered.size
            else None,
            "devices_recovered": int(recovered.size),
            "p50_recovered_s": round(float(np.median(recovered)), 2)
            if recovered.size
            else None,
        }
    watchers = [w for r in results for w in r.watchers]
    if watchers:
        out["watchers"] = watch_availability(watchers)
    if "faults" in samples:
        out["faults"] = samples["faults"]
    return out


def run_peer(args: argparse.Namespace, data_dir: Path) -> dict:
    """The same devices and watchers against the echo peer: its latencies, CPU and
    memory (the peer stores nothing, so there is nothing to verify)."""
    peer = EchoPeer(data_dir, args.server_cpus)
    try:
        peer_args = argparse.Namespace(**{**vars(args), "profile": None})
        plans = build_plans(peer_args, peer.target)
        results, samples = run_drivers(plans, watch_ids(args), peer.pid, peer_args)
    finally:
        peer.stop()
    out = report(peer_args, plans, results, samples)
    return {key: out[key] for key in PEER_KEEPS}


PEER_KEEPS = [
    *("streams_open", "ack", "watch", "send_lag", "counts", "errors", "server"),
    *("drivers_cpu_cores", "machine_busy_cores", "other_work_cores"),
]


# (what, the result's path to it): the server's figures divided by the peer's.
PEER_RATIOS = [
    ("ack p50 (ms)", ("ack", "p50_ms")),
    ("ack p99 (ms)", ("ack", "p99_ms")),
    ("watcher p50 (ms)", ("watch", "p50_ms")),
    ("watcher p99 (ms)", ("watch", "p99_ms")),
    ("server CPU per fix (µs)", ("server", "cpu_us_per_fix")),
    ("server KB per stream", ("server", "rss_kb_per_stream")),
]


def vs_peer(out: dict, peer: dict) -> dict:
    """Each of PEER_RATIOS as the server's value, the peer's, and their ratio."""
    compared = {}
    for name, (section, key) in PEER_RATIOS:
        ours, theirs = out[section].get(key), peer[section].get(key)
        ratio = None if ours is None or not theirs else round(ours / theirs, 2)
        compared[name] = {"server": ours, "peer": theirs, "ratio": ratio}
    return compared


def describe_vs_peer(compared: dict) -> str:
    lines = [f"{'against the echo peer':<26}{'server':>10}{'peer':>10}{'ratio':>8}"]
    for name, row in compared.items():
        server, peer, ratio = (
            "-" if row[k] is None else row[k] for k in ("server", "peer", "ratio")
        )
        lines.append(f"{name:<26}{server:>10}{peer:>10}{ratio:>8}")
    return "\n".join(lines)


def watch_availability(watchers: list[WatcherReport]) -> dict:
    """Reconnects and the longest gaps without live updates, of every watcher
    (lists: one entry per watcher)."""
    reconnected = [s for w in watchers for s in w.reconnected_s]
    return {
        "count": len(watchers),
        "reconnects": sum(w.reconnects for w in watchers),
        "longest_reconnect_s": round(max(reconnected), 3) if reconnected else None,
        "longest_gap_s": round(max(w.longest_gap_s for w in watchers), 3),
        "longest_device_gap_s": round(max(w.longest_device_gap_s for w in watchers), 3),
        "reconnects_each": [w.reconnects for w in watchers],
        "longest_gap_s_each": [round(w.longest_gap_s, 3) for w in watchers],
        "longest_device_gap_s_each": [
            round(w.longest_device_gap_s, 3) for w in watchers
        ],
        "devices_watched_each": [w.devices_watched for w in watchers],
        "devices_updated_each": [w.devices_updated for w in watchers],
        "devices_updated_on_last_stream_each": [
            w.devices_updated_on_last_stream for w in watchers
        ],
    }


def describe_watchers(watchers: dict) -> str:
    """One line of watch availability for the terminal."""
    back = watchers["longest_reconnect_s"]
    watched = [
        "tenant" if n is None else str(n) for n in watchers["devices_watched_each"]
    ]
    return (
        f"Watchers: {watchers['count']}, {watchers['reconnects']} "
        f"reconnects {watchers['reconnects_each']}"
        + (f" (slowest back in {back:.2f} s)" if back is not None else "")
        + f"; longest gap without updates {watchers['longest_gap_s']:.2f} s "
        f"{watchers['longest_gap_s_each']}, for one device "
        f"{watchers['longest_device_gap_s']:.2f} s; devices updated in the window "
        f"{watchers['devices_updated_each']} and on the last stream "
        f"{watchers['devices_updated_on_last_stream_each']} of {watched}"
    )


def print_report(out: dict) -> None:
    print(f"\n=== load run {out['name']} ===")
    print(f"streams open (max): {out['streams_open']}")
    for key, title in [
        ("ack", "Fix sent -> ack"),
        ("watch", "Fix time -> watcher update"),
        ("batch", "Gateway PublishBatch"),
        ("send_lag", "Driver lag (scheduled -> written)"),
    ]:
        if out[key]["count"]:
            print(stats.format_summary(title, out[key]))
    print(stats.format_counts("Counts", out["counts"]))
    print(stats.format_counts("Errors", out["errors"]))
    for name, detail in out["error_details"].items():
        print(f"  {name}: {detail}")
    if out["errors"] and out.get("server_log_tail"):
        print("Server log (last lines):", *out["server_log_tail"], sep="\n  ")
    server = out["server"]
    print(
        f"Server: {server['cpu_cores']} cores, {server['cpu_us_per_fix']} µs CPU/fix, "
        f"RSS {server['rss_baseline_mb']} -> {server['rss_steady_mb']} MB, "
        f"{server['rss_kb_per_stream']} KB/stream"
    )
    if server.get("stalls"):
        print(f"Server stalls: {stalls.describe(server['stalls'])}")
    print(
        f"Drivers ({out['device_driver']} devices): {out['drivers_cpu_cores']} cores "
        f"{out['driver_process_cpu_cores']}; whole machine busy "
        f"{out['machine_busy_cores']} cores; backends {out['backend_cpu_cores']} "
        f"(exact: {out['backend_exact']}), µs/fix {out['backend_us_per_fix']}; "
        f"other work on the machine {out['other_work_cores']} cores"
    )
    if out["redis_shard_cpu_cores"]:
        print(f"Redis shards (cores each): {out['redis_shard_cpu_cores']}")
    if out.get("observer"):
        print(f"Observer (a server with no clients): {json.dumps(out['observer'])}")
    if out.get("idle"):
        print(f"Idle before the run: {json.dumps(out['idle'])}")
    if out.get("watchers"):
        print(describe_watchers(out["watchers"]))
    for key in ("faults", "storm", "verify"):
        if key in out:
            print(f"{key}: {json.dumps(out[key])}")
    if "vs_peer" in out:
        peer = out["peer"]
        print(
            f"Echo peer: {peer['streams_open']} streams, errors {peer['errors']}, "
            f"{peer['server']['cpu_cores']} cores, machine busy "
            f"{peer['machine_busy_cores']} cores, other work "
            f"{peer['other_work_cores']} cores"
        )
        print(describe_vs_peer(out["vs_peer"]))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--name", default="run", help="results go to bench/results/load_<name>.json")
    add("--devices", type=int, default=1000, help="device streams in all")
    add("--interval-s", type=float, default=5.0, help="seconds between fixes")
    add("--drivers", type=int, default=2, help="driver processes for the devices")
    add("--ramp-s", type=float, default=10.0, help="streams open over this time")
    add("--steady-s", type=float, default=30.0, help="measured steady state")
    add(
        "--settle-s",
        type=float,
        default=0.0,
        help="unmeasured time between the ramp and the steady state (start-up "
        "garbage collection and backlogs of the ramp)",
    )
    add("--streams-per-channel", type=int, default=500)
    add(
        "--driver-nice",
        type=int,
        default=10,
        help="niceness added to the driver processes, so that the simulated devices "
        "(which stand in for other machines) never take the CPU from the server "
        "under test; 0 lets them compete",
    )
    add(
        "--driver-cpus",
        type=_cpu_list,
        default=(),
        help="CPUs the driver processes may run on, as 0,1 (default: any); "
        "the server, PostgreSQL and Redis keep every CPU",
    )
    add(
        "--server-cpus",
        type=_cpu_list,
        default=(),
        help="CPUs the spawned server (and the echo peer) may run on, as 0 "
        "(default: any), as taskset would keep them; PostgreSQL and Redis keep "
        "every CPU",
    )
    add(
        "--node-option",
        action="append",
        default=[],
        help="an option for node in the node drivers (repeatable), for example "
        "--node-option=--single-threaded-gc",
    )
    add(
        "--device-driver",
        choices=("python", "node"),
        default="python",
        help="what runs the device streams: Python grpc.aio processes, or Node.js "
        "@grpc/grpc-js ones (bench/node_driver, about half the CPU per fix)",
    )
    add("--watchers", type=int, default=1, help="Watch streams (a driver of their own)")
    add("--watch-devices", type=int, default=0, help="watch only this many devices")
    add("--want-events", action="store_true", help="devices ask for their events")
    add("--gateways", type=int, default=0, help="gateways in all")
    add("--gateway-rate", type=float, default=10.0, help="batches/s per gateway")
    add("--gateway-batch", type=int, default=1000, help="fixes per batch")
    add("--gateway-devices", type=int, default=10_000, help="devices per gateway")
    add("--fences", type=int, default=0, help="polygon fences to create first")
    add("--storm", action="store_true", help="drop every stream, then resume")
    add("--storm-at-s", type=float, default=10.0, help="into the steady state")
    add("--storm-spread-s", type=float, default=10.0, help="reconnect jitter")
    add(
        "--kill-worker-at-s",
        type=float,
        help="SIGKILL one server worker this many seconds into the steady state "
        "(the watchers' one, or the busiest; needs --workers 2 or more)",
    )
    add(
        "--restart-redis-at-s",
        type=float,
        help="kill the private Redis (first shard) this many seconds into the "
        "steady state and start it again, empty (needs --redis-shards)",
    )
    add("--redis-down-s", type=float, default=1.0, help="Redis down this long")
    add(
        "--stop-postgres-at-s",
        type=float,
        help="stop the private PostgreSQL this many seconds into the steady state "
        "and start it again (needs --private-postgres); the server's memory is "
        "read each second after",
    )
    add("--postgres-down-s", type=float, default=20.0, help="PostgreSQL down this long")
    add("--production", action="store_true", help="PostgreSQL + Redis backends")
    add("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    add("--redis-url", default="redis://127.0.0.1:6379/0")
    add("--workers", type=int, default=1, help="server processes (needs --production)")
    add(
        "--redis-shards",
        type=int,
        default=0,
        help="start a private Redis Cluster of N masters (0: the Redis at --redis-url)",
    )
    add(
        "--private-postgres",
        action="store_true",
        help="start a PostgreSQL server of this run's own (exact CPU)",
    )
    add(
        "--postgres-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the private PostgreSQL server (repeatable), e.g. "
        "shared_buffers=2GB",
    )
    add("--idle-s", type=float, default=0.0, help="measure idle server CPU first")
    add(
        "--observer",
        action="store_true",
        help="also run a server with no clients on the same backends (the cost "
        "of receiving the fleet's live updates)",
    )
    add("--target", help="use a running server at this loopback address")
    add("--server-pid", type=int, help="its pid, for CPU and memory")
    add(
        "--run-tag",
        help="put this in every device id (default with --target: a new tag each "
        "run, so that a server holding an earlier run's devices stores this one's "
        "fixes instead of taking them for resends)",
    )
    add("--server-flag", action="append", default=[], help="extra flag for serve")
    add("--profile", help="py-spy the server in steady state (.svg or .txt)")
    add("--profile-native", action="store_true", help="profile C frames too")
    add(
        "--peer",
        action="store_true",
        help="then run the same devices and watchers against a bare grpc.aio echo "
        "(bench/echo_peer.py) and report the ratios",
    )
    add("--json", help="path of the JSON result (default bench/results/...)")
    args = parser.parse_args(argv)
    if args.ramp_s + args.settle_s + args.steady_s > MAX_RUN_S:
        parser.error(f"ramp + settle + steady must stay within {MAX_RUN_S:.0f} s")
    if args.target and not args.target.startswith(("127.0.0.1:", "localhost:")):
        parser.error("--target must be a loopback address")
    for url in (args.pg_admin_url, args.redis_url):
        if not on_this_machine(url):
            parser.error(f"{url} is neither on loopback nor a local socket")
    if args.workers > 1 and not args.production:
        parser.error("--workers above 1 needs --production (shared backends)")
    if (args.redis_shards or args.private_postgres) and not args.production:
        parser.error("--redis-shards and --private-postgres need --production")
    if args.postgres_setting and not args.private_postgres:
        parser.error("--postgres-setting needs --private-postgres")
    for setting in args.postgres_setting:
        name, _, value = setting.partition("=")
        if not re.fullmatch(r"[a-z_.]+", name) or not re.fullmatch(r"[\w.]+", value):
            parser.error(f"--postgres-setting {setting!r}: expected name=value")
    if args.observer and (args.target or not args.production):
        parser.error("--observer needs --production and a spawned server")
    check_faults(parser, args)
    if args.peer and (args.gateways or args.want_events or args.storm):
        parser.error("--peer compares device streams and watchers only")
    if args.peer and not args.devices:
        parser.error("--peer needs --devices: the comparison is of device streams")
    faults = (args.kill_worker_at_s, args.restart_redis_at_s, args.stop_postgres_at_s)
    if args.peer and any(at_s is not None for at_s in faults):
        parser.error("--peer runs without faults")
    if args.target and not args.server_pid:
        parser.error("--target needs --server-pid (CPU and memory are read from /proc)")
    if args.run_tag is None:  # a spawned server starts empty: the ids of old runs
        args.run_tag = uuid.uuid4().hex[:8] if args.target else ""
    if not re.fullmatch(r"[A-Za-z0-9_.]*", args.run_tag):
        parser.error("--run-tag takes letters, digits, '_' and '.'")
    if args.device_driver == "node" and args.devices:
        try:
            check_installed()
        except NodeDriverError as exc:
            parser.error(str(exc))
    if args.profile and not PY_SPY.exists():
        parser.error(
            f"--profile needs py-spy: {Path(sys.executable).parent}/pip install py-spy"
        )
    return args


def check_faults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Faults need what they act on: workers to spare, a Redis of the run's own."""
    for name in ("kill_worker_at_s", "restart_redis_at_s", "stop_postgres_at_s"):
        at_s = getattr(args, name)
        if at_s is not None and not 0 <= at_s < args.steady_s:
            parser.error(f"--{name.replace('_', '-')} must lie in the steady state")
    if args.kill_worker_at_s is not None and (args.workers < 2 or args.target):
        parser.error("--kill-worker-at-s needs a spawned server with --workers 2+")
    if args.restart_redis_at_s is not None and not args.redis_shards:
        parser.error("--restart-redis-at-s needs a private Redis (--redis-shards)")
    if args.stop_postgres_at_s is not None and not args.private_postgres:
        parser.error("--stop-postgres-at-s needs --private-postgres")


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    driver.raise_open_file_limit()
    with (
        tempfile.TemporaryDirectory(prefix="tracking-load-") as tmp,
        contextlib.ExitStack() as cleanup,  # runs on errors and Ctrl-C as well
    ):
        server = production = observer = None
        if args.production:
            production = Production(
                args.pg_admin_url,
                args.redis_url,
                args.redis_shards,
                args.private_postgres,
                args.postgres_setting,
            )
            cleanup.callback(production.close)
        if args.target:
            target, pid = args.target, args.server_pid or 0
        else:
            flags = [*args.server_flag, *(production.flags if production else [])]
            flags += [f"--workers={args.workers}"] if args.workers > 1 else []
            server = SpawnedServer(Path(tmp), flags, args.server_cpus)
            cleanup.callback(server.stop)
            target, pid = server.target, server.pid
            if args.observer and production is not None:
                observer_dir = Path(tmp) / "observer"
                observer_dir.mkdir()
                observer = SpawnedServer(observer_dir, production.flags)
                cleanup.callback(observer.stop)
        plans = build_plans(args, target)
        fence_count = import_fences(target, args.fences, plans[0]) if args.fences else 0
        observer_pid = observer.pid if observer is not None else None
        idle = measure_idle(pid, production, args.idle_s, observer_pid)
        plans = build_plans(args, target)  # a fresh start time after the import
        metrics_url = server.metrics_url if server is not None else None
        results, samples = run_drivers(
            plans, watch_ids(args), pid, args, production, observer_pid, metrics_url
        )
        out = report(args, plans, results, samples)
        out["fences"] = fence_count
        out["idle"] = idle
        if production is not None:
            out["redis_shards"] = args.redis_shards
        if server is not None:
            out["server_exit_code"] = server.stop()
            log_lines = (Path(tmp) / "server.log").read_text().splitlines()
            out["server_log_tail"] = log_lines[-20:]
            if production is not None:
                out["verify"] = verify(production.stored(), results)
            elif args.workers == 1:
                out["verify"] = verify(sqlite_stored(Path(tmp)), results)
        if args.peer:
            out["peer"] = run_peer(args, Path(tmp))
            out["vs_peer"] = vs_peer(out, out["peer"])
    print_report(out)
    path = Path(args.json) if args.json else RESULTS / f"load_{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
