"""Capacity model: server processes, Redis shards and PostgreSQL nodes for N devices.

Every input is MEASURED (read from the scaled-down runs of ``bench/scale_matrix.sh``
in bench/results, or timed here in the same run) or ASSUMED (a stated planning
figure). The model prints both, the scaling it measured as processes and shards
were added, then what 1 million and 100 million devices at one fix every 10 s need,
and writes bench/results/capacity.json.

    bench/scale_matrix.sh && .venv/bin/python bench/capacity.py

How the runs become a model. At a fixed offered rate R (fixes/s) the runs at 1, 2
and 4 server processes give, for the server, PostgreSQL and Redis alike,

    cores(W) = intercept + slope * W          (least squares over W = 1, 2, 4)

``intercept / R`` is the cost per fix; ``slope`` what one more process costs at that
rate. For the server, the slope is split into what a process costs idle (measured
before each run, fences loaded, no load) and what it pays per fix of the whole
fleet, measured by the observer (a server with no clients). Before the fan-out was
routed every process received every live update, so that was 60-150 µs per fleet
fix and capped a deployment near 8,000 fixes/s; routed, a process receives only
what its watchers want, so the observer should pay nothing, and each update a
watcher wants costs a message to its process (``bench/fanout_bench.py``: the
publisher per interested process, the receiver per message). For Redis, the slope
may grow with R; for PostgreSQL it is a constant per process (its group commits, at
most one per flush interval). Redis per fix at 3 shards against 1 gives the cost of
sharding.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "generated")]

from tracking.v1 import track_pb2  # noqa: E402

from tracking_grpc import convert  # noqa: E402
from tracking_grpc.core.fixes import FixBatch  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FIX_INTERVAL_S = 10.0
FLEETS = (1_000_000, 100_000_000)
KINDS = ("streams", "gateway")
WORKERS = (1, 2, 4)
SHARDS = (1, 3)

ASSUMED = {
    "core_utilisation": 0.6,  # plan each core to 60 % busy: headroom for latency
    "server_process_memory_gb": 4.0,  # resident budget of one server process
    "watch_fanout": 1.0,  # watcher updates per fix (each fix watched once on average)
    "redis_shard_cores": 1.0,  # Redis executes commands on one thread
    "redis_bytes_per_device": 400,  # live position hash + geo index entry
    "redis_shard_memory_gb": 8.0,
    "pg_node_cores": 16,
    "pg_bytes_per_fix": 250,  # heap row + two indexes, before compression
    "retention_days": 30,
    # Stored events (geofence, activity, route) per fix: the real traces raise
    # 0.01 (a walker) to 0.12 (buses, taxis), most of them MOTION_CHANGED.
    "events_per_fix": 0.12,
}


def run_name(kind: str, workers: int, shards: int) -> str:
    return f"scale_{kind}_w{workers}_r{shards}"


def load(name: str) -> dict | None:
    path = RESULTS / f"load_{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def routed_cost_us() -> dict | None:
    """Server CPU per update delivered to another process, from the fan-out bench:
    the receiver's cost of a one-fix message (each delivered fix taken to travel
    alone, the dearest case) and what one more interested process adds to a
    publisher's commit (the slope from 1 to 16 processes, 10-fix commits)."""
    path = RESULTS / "fanout_bench.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    stream = next(
        r for r in data["publish_cpu_per_commit"] if r["fixes_per_commit"] == 10
    )
    per_process = (stream["routed_16_us"] - stream["routed_1_us"]) / 15
    receive = next(r for r in data["receive_cpu"] if r["fixes_per_message"] == 1)
    return {
        "publisher_us_per_interested_process": per_process,
        "receiver_us_per_message": receive["us_per_message"],
        "us_per_delivered_update": per_process + receive["us_per_message"],
        "publisher_us_per_commit_nobody_watching": stream["routed_0_us"],
        "publisher_us_per_commit_broadcast": stream["broadcast_us"],
    }


def event_cost_us() -> dict | None:
    """What one stored event costs PostgreSQL and the Redis shard holding its event
    stream (``bench/event_store_bench.py``: the store's write, then the outbox's
    read, XADD and mark; the dearer of geofence and activity events)."""
    path = RESULTS / "event_store_bench.json"
    if not path.exists():
        return None
    steps = json.loads(path.read_text())["per_event"]
    costs = {"pg_us": 0.0, "redis_us": 0.0}
    for kind in ("geofence", "activity"):
        add, outbox = (
            steps[f"postgres add, {kind}"],
            steps[f"postgres outbox to redis, {kind}"],
        )
        if "postgres_cpu_us" not in add or "redis_cpu_us" not in outbox:
            return None  # written before the bench measured the servers
        pg = add["postgres_cpu_us"] + outbox["postgres_cpu_us"]
        costs["pg_us"] = max(costs["pg_us"], pg)
        costs["redis_us"] = max(costs["redis_us"], outbox["redis_cpu_us"])
    return costs


def watcher_cost_us() -> float:
    """Server CPU per watcher update: Position messages built and serialised."""
    n = 1_000
    rng = np.random.default_rng(1)
    batch = FixBatch.from_columns(
        "t",
        np.array([f"dev-{i:06d}" for i in range(n)], dtype=object),
        np.arange(1, n + 1),
        np.full(n, 1_700_000_000_000),
        rng.uniform(51, 52, n),
        rng.uniform(-1, 0, n),
        accuracy_m=np.full(n, 5.0),
    )
    started = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        response = track_pb2.WatchResponse(positions=convert.positions(batch))
        response.SerializeToString()
    return (time.perf_counter() - started) / (rounds * n) * 1e6


def summary(data: dict) -> dict:
    """What the model and the table need from one load run."""
    steady_s = data["args"]["steady_s"]
    rate = data["fixes_in_window"] / steady_s
    idle = data.get("idle") or {}
    backend = data["backend_cpu_cores"]
    shards = data.get("redis_shard_cpu_cores") or []
    observer = data.get("observer") or {}
    receive = None
    if observer.get("cpu_cores") is not None and rate:
        idle_observer = idle.get("observer_cores") or 0.0
        receive = (observer["cpu_cores"] - idle_observer) / rate * 1e6
    return {
        "observer_us_per_fleet_fix": None if receive is None else round(receive, 2),
        "workers": data["args"]["workers"],
        "redis_shards": data.get("redis_shards", 0),
        "fixes_per_s": round(rate, 1),
        "server_cores": data["server"]["cpu_cores"],
        "server_us_per_fix": data["server"]["cpu_us_per_fix"],
        "process_cores": data["server"].get("process_cpu_cores"),
        "process_connections": data["server"].get("process_connections"),
        "idle_server_cores": idle.get("server_cores"),
        "idle_processes": idle.get("server_processes"),
        "rss_baseline_mb": data["server"]["rss_baseline_mb"],
        "kb_per_stream": data["server"]["rss_kb_per_stream"],
        "streams": data["streams_open"],
        "rss_growth_mb": data["server"]["rss_steady_mb"]
        - data["server"]["rss_baseline_mb"],
        "run": data["name"],
        "pg_cores": backend.get("postgres"),
        "redis_cores": backend.get("redis-server"),
        "pg_us_per_fix": data.get("backend_us_per_fix", {}).get("postgres"),
        "redis_us_per_fix": data.get("backend_us_per_fix", {}).get("redis-server"),
        "redis_shard_cores": shards,
        "backends_exact": data.get("backend_exact", {}),
        "ack_p50_ms": data["ack"].get("p50_ms"),
        "ack_p99_ms": data["ack"].get("p99_ms"),
        "batch_p50_ms": data["batch"].get("p50_ms"),
        "batch_p99_ms": data["batch"].get("p99_ms"),
        "watch_p99_ms": data["watch"].get("p99_ms"),
        "errors": sum(data["errors"].values()),
        "fixes_lost": data.get("verify", {}).get("fixes_lost"),
        "machine_busy_cores": data["machine_busy_cores"],
    }


def fit_costs(
    rows: list[dict], key: str, free: tuple[str, ...], fixed: dict | None = None
) -> dict[str, float]:
    """Least squares of ``cores = a*R + b*W + d*R*W`` over runs; ``fixed`` terms
    are given, not fitted. a: core-seconds per fix; b: cores per process; d:
    core-seconds per fix of the whole fleet, per process; e (``+ e*S``): cores per
    open stream, whatever its rate."""
    fixed = dict(fixed or {})
    while True:  # no cost is negative: a term fitted below zero is fixed at zero
        if not free:
            return fixed
        coef = _least_squares(rows, key, free, fixed)
        if all(c >= 0 for c in coef.values()):
            return {**fixed, **coef}
        worst = min(coef, key=lambda t: coef[t])
        fixed[worst] = 0.0
        free = tuple(t for t in free if t != worst)


def _least_squares(
    rows: list[dict], key: str, free: tuple[str, ...], fixed: dict
) -> dict[str, float]:
    rate = np.array([r["fixes_per_s"] for r in rows], float)
    workers = np.array([r["workers"] for r in rows], float)
    streams = np.array([r.get("streams") or 0 for r in rows], float)
    columns = {"a": rate, "b": workers, "d": rate * workers, "e": streams}
    y = np.array([r[key] for r in rows], float)
    y = y - sum(fixed[t] * columns[t] for t in fixed)
    matrix = np.column_stack([columns[t] for t in free])
    coef = np.linalg.lstsq(matrix, y, rcond=None)[0]
    return {t: float(c) for t, c in zip(free, coef, strict=True)}


def scaling(kinds: tuple[str, ...], fixed_b: float | None = None) -> dict | None:
    """Per-fix and per-process costs of one kind of load, from its 1/2/4 runs.

    Two rates over the same open streams (1 fix / 5 s and / 10 s) tell the cost
    per fix (a) from the cost per open stream (e). The receive cost (d) comes from
    the observer (``fleet_receive``); without one it is fitted, with b fixed to
    ``fixed_b`` (or the idle cost) when there is one rate only.
    """
    names = [run_name(k, w, 1) for k in kinds for w in WORKERS]
    runs = [load(n) for n in names]
    rows = [summary(r) for r in runs if r is not None]
    if len({r["workers"] for r in rows}) < 2:
        return None
    idle = float(np.mean([r["idle_server_cores"] / r["workers"] for r in rows]))
    two_rates = len({round(r["fixes_per_s"], -2) for r in rows}) > 1
    # What a process pays per fix of the whole fleet, measured on a server with
    # no clients (the observer): the slope of its CPU against the fleet's rate.
    fleet = fleet_receive()
    receive = {"d": fleet["us_per_fleet_fix"] / 1e6} if fleet else None
    if two_rates:
        free = ("a", "b", "e") if receive else ("a", "b", "d", "e")
        server = fit_costs(rows, "server_cores", free, receive)
        redis = fit_costs(rows, "redis_cores", ("a", "b", "d"))
    elif receive:
        server = fit_costs(rows, "server_cores", ("a", "b"), {**receive, "e": 0.0})
        redis = fit_costs(rows, "redis_cores", ("a", "d"), {"b": 0.0})
    else:
        b = {"b": idle if fixed_b is None else fixed_b, "e": 0.0}
        server = fit_costs(rows, "server_cores", ("a", "d"), b)
        redis = fit_costs(rows, "redis_cores", ("a", "d"), {"b": 0.0})
    pg = fit_costs(rows, "pg_cores", ("a", "b"))
    streams = [r["streams"] for r in rows if r["streams"]]
    memory = baseline = None
    if streams:
        # RSS growth under load = per stream * streams + per process * W.
        growth = fit_costs(
            [{**r, "fixes_per_s": 1.0} for r in rows], "rss_growth_mb", ("a", "b")
        )
        memory = {
            "kb_per_stream": growth["a"] / float(np.mean(streams)) * 1024,
            "mb_per_process_under_load": growth["b"],
        }
    baseline = fit_costs(
        [{**r, "fixes_per_s": 1.0} for r in rows], "rss_baseline_mb", ("a", "b")
    )
    return {
        "by_connections": by_connections(rows, fixed_cores_of(server, idle)),
        "rates_fixes_per_s": sorted({round(r["fixes_per_s"], -1) for r in rows}),
        "server_us_per_fix": server["a"] * 1e6,
        "server_cores_per_process": server["b"],
        "server_idle_cores_per_process": idle,
        "server_us_per_fix_per_process": max(0.0, server["d"]) * 1e6,
        "server_receive_measured_by": "observer" if receive else "fit",
        "fleet_receive": fleet,
        "server_us_per_stream_s": max(0.0, server["e"]) * 1e6,
        "pg_us_per_fix": pg["a"] * 1e6,
        "pg_cores_per_process": max(0.0, pg["b"]),
        "redis_us_per_fix": redis["a"] * 1e6,
        "redis_cores_per_process": redis["b"],
        "redis_us_per_fix_per_process": max(0.0, redis["d"]) * 1e6,
        "rss_mb_per_process_at_start": baseline["b"],
        "rss_mb_first_process_at_start": baseline["a"] + baseline["b"],
        **(memory or {}),
        "runs": [n for n, r in zip(names, runs, strict=True) if r is not None],
        "rows": rows,
    }


def fleet_receive() -> dict | None:
    """The observer's CPU above its idle CPU against the fleet's rate, fitted over
    every run that had one (500 to 3,900 fixes/s, streams and gateways alike):
    the slope is what a process with no clients pays per fix of the fleet (the
    broadcast made it 5-150 µs; routed, nothing is sent to it), the intercept
    what it pays whatever the rate (heartbeats, health probes, timers)."""
    rows = [r for r in all_rows() if r["observer_us_per_fleet_fix"] is not None]
    if len({round(r["fixes_per_s"], -2) for r in rows}) < 2:
        return None
    rate = np.array([r["fixes_per_s"] for r in rows])
    cores = np.array([r["observer_us_per_fleet_fix"] for r in rows]) * rate / 1e6
    slope, intercept = np.polyfit(rate, cores, 1)
    return {
        "us_per_fleet_fix": max(0.0, float(slope)) * 1e6,
        "fitted_us_per_fleet_fix": float(slope) * 1e6,
        "cores_at_any_rate": float(intercept),
        "runs": len(rows),
        "rates_fixes_per_s": sorted({round(float(x), -1) for x in rate}),
    }


def fixed_cores_of(server: dict, idle: float) -> float:
    return max(server["b"], idle)


def by_connections(rows: list[dict], fixed: float) -> dict | None:
    """A check of the receive cost from inside the runs with several workers.

    The kernel hands connections to workers unevenly; a worker's CPU against the
    client connections it holds, ``cores = per_connection * n + zero``, gives what
    a worker with no clients costs (``zero``): its fixed cost plus whatever it
    receives of the fleet's updates. (``zero`` - fixed) / R is that cost per fix.
    """
    points = []
    for r in rows:
        cores, held = r["process_cores"], r["process_connections"]
        if r["workers"] < 2 or not cores or not held or len(cores) != len(held):
            continue
        for c, n in zip(cores[1:], held[1:], strict=True):  # [0]: the supervisor
            points.append((r["fixes_per_s"], n, c))
    if points:  # one rate: the highest (streams run at two)
        top = max(round(p[0], -2) for p in points)
        points = [p for p in points if round(p[0], -2) == top]
    if len(points) < 3 or len({p[1] for p in points}) < 2:
        return None
    rate = float(np.mean([p[0] for p in points]))
    slope, zero = np.polyfit([p[1] for p in points], [p[2] for p in points], 1)
    return {
        "workers_seen": len(points),
        "rate_fixes_per_s": rate,
        "cores_per_connection": float(slope),
        "cores_with_no_connections": float(zero),
        "us_per_fleet_fix_per_process": max(0.0, float(zero) - fixed) / rate * 1e6,
    }


def sharding() -> dict | None:
    """Redis cost per fix with 3 shards against 1, at the same server processes."""
    pairs = []
    for kind in ("streams", "gateway"):
        for workers in (1, 2):
            one, three = (load(run_name(kind, workers, s)) for s in SHARDS)
            if one is None or three is None:
                continue
            a, b = summary(one), summary(three)
            shard_cores = b["redis_shard_cores"] or [0.0]
            pairs.append(
                {
                    "kind": kind,
                    "workers": workers,
                    "redis_us_per_fix_1_shard": a["redis_us_per_fix"],
                    "redis_us_per_fix_3_shards": b["redis_us_per_fix"],
                    "ratio_3_to_1": b["redis_us_per_fix"] / a["redis_us_per_fix"]
                    if a["redis_us_per_fix"]
                    else None,
                    "shard_cores": shard_cores,
                    "hottest_shard_share": max(shard_cores) / sum(shard_cores)
                    if sum(shard_cores)
                    else None,
                    "server_us_per_fix_1_shard": a["server_us_per_fix"],
                    "server_us_per_fix_3_shards": b["server_us_per_fix"],
                }
            )
    ratios = [p["ratio_3_to_1"] for p in pairs if p["ratio_3_to_1"]]
    if not ratios:
        return None
    return {"pairs": pairs, "redis_ratio_3_to_1": float(np.mean(ratios))}


def fixed_cores(s: dict) -> float:
    """A process's cost whatever its load: the fitted one, at least the idle one."""
    return max(s["server_cores_per_process"], s["server_idle_cores_per_process"])


def processes_for(rate: float, streams: int, s: dict, util: float) -> float:
    """Server processes for ``rate`` fixes/s over ``streams`` open streams.

    Each process does its share of the per-fix work (``per_fix_us``: the fitted
    cost, the watcher update and the routed delivery, ``watch_fanout`` per fix),
    pays its fixed cost, and whatever it still receives of the whole fleet
    (``d``, measured by the observer). Infinite when that alone fills a process.
    """
    spare = util - fixed_cores(s) - rate * s["server_us_per_fix_per_process"] / 1e6
    work = rate * s["per_fix_us"] / 1e6 + streams * s["server_us_per_stream_s"] / 1e6
    return math.inf if spare <= 0 else work / spare


def plan(
    devices: int,
    stream: dict,
    gateway: dict,
    shard: dict | None,
    event: dict | None = None,
) -> dict:
    """Processes, shards and nodes for ``devices`` sending one fix per interval."""
    a = ASSUMED
    rate = devices / FIX_INTERVAL_S
    util = a["core_utilisation"]
    out: dict = {"devices": devices, "fixes_per_s": rate}
    for kind, s in (("stream", stream), ("gateway", gateway)):
        streams = devices if kind == "stream" else 0
        fan_us = s["server_us_per_fix_per_process"]
        out[f"{kind}_fleet_receive_limit_fixes_per_s"] = (
            round((util - fixed_cores(s)) / fan_us * 1e6) if fan_us > 0 else None
        )
        needed = processes_for(rate, streams, s, util)
        out[f"{kind}_processes_by_cpu"] = (
            None if math.isinf(needed) else round(needed, 1)
        )
    # Memory: what a process holds at start and gains under load, then per stream.
    usable_mb = a["server_process_memory_gb"] * 1024 - (
        stream["rss_mb_first_process_at_start"]
        + max(0.0, stream["mb_per_process_under_load"])
    )
    streams_per_process = usable_mb * 1024 / stream["kb_per_stream"]
    out["streams_per_process_by_memory"] = round(streams_per_process)
    out["stream_processes_by_memory"] = round(devices / streams_per_process, 1)
    by_cpu = out["stream_processes_by_cpu"]
    out["stream_processes"] = (
        None
        if by_cpu is None
        else math.ceil(max(by_cpu, out["stream_processes_by_memory"]))
    )
    gateway_cpu = out["gateway_processes_by_cpu"]
    out["gateway_processes"] = None if gateway_cpu is None else math.ceil(gateway_cpu)
    # Redis: per fix, times the measured cost of 3 shards over 1, plus delivering
    # each update to watch_fanout subscribers (routed fan-out).
    ratio = (shard or {}).get("redis_ratio_3_to_1") or 1.0
    redis_us = stream["redis_us_per_fix"] * ratio
    redis_us += a["watch_fanout"] * stream["redis_us_per_fix_per_process"]
    redis_cpu = rate * redis_us / 1e6 / util / a["redis_shard_cores"]
    redis_memory = (
        devices * a["redis_bytes_per_device"] / (a["redis_shard_memory_gb"] * 2**30)
    )
    # Events: every one goes to its partition's Redis Stream, one key, so one
    # shard's single thread takes all of a partition's appends.
    events_per_s = rate * a["events_per_fix"]
    out["events_per_s"] = round(events_per_s)
    if event is not None:
        stream_cores = events_per_s * event["redis_us"] / 1e6
        out["event_stream_cores"] = round(stream_cores, 2)
        out["event_stream_partitions"] = math.ceil(
            stream_cores / util / a["redis_shard_cores"]
        )
        redis_cpu += stream_cores / util / a["redis_shard_cores"]
    out["redis_us_per_fix"] = round(redis_us, 1)
    out["redis_shards_by_cpu"] = round(redis_cpu, 1)
    out["redis_shards_by_memory"] = round(redis_memory, 1)
    out["redis_shards"] = math.ceil(max(redis_cpu, redis_memory, 1))
    # PostgreSQL: per fix, plus each server process's group commits.
    for kind, s in (("streams", stream), ("gateways", gateway)):
        processes = (
            out["stream_processes" if kind == "streams" else "gateway_processes"] or 0
        )
        cores = rate * s["pg_us_per_fix"] / 1e6 + processes * s["pg_cores_per_process"]
        if event is not None:
            cores += events_per_s * event["pg_us"] / 1e6
        out[f"pg_cores_{kind}"] = round(cores / util, 1)
        out[f"pg_nodes_{kind}"] = math.ceil(cores / util / a["pg_node_cores"])
    daily_tb = rate * 86_400 * a["pg_bytes_per_fix"] / 1e12
    out |= {
        "pg_tb_per_day": round(daily_tb, 2),
        "pg_partitions": a["retention_days"],
        "pg_tb_retained": round(daily_tb * a["retention_days"], 1),
    }
    return out


SHOWN = (
    ("server_us_per_fix", "server CPU per fix, µs"),
    ("server_cores_per_process", "server cores per added process (fit)"),
    ("server_idle_cores_per_process", "server cores per idle process"),
    ("server_us_per_fix_per_process", "server µs per fleet fix per process"),
    ("server_us_per_stream_s", "server µs per open stream per second"),
    ("pg_us_per_fix", "PostgreSQL CPU per fix, µs"),
    ("pg_cores_per_process", "PostgreSQL cores per server process"),
    ("redis_us_per_fix", "Redis CPU per fix, µs"),
    ("redis_us_per_fix_per_process", "Redis µs per fix per subscriber"),
    ("rss_mb_per_process_at_start", "MB per added process at start"),
    ("mb_per_process_under_load", "MB per process gained under load"),
    ("kb_per_stream", "KB per open stream"),
)


def show_inputs(stream: dict | None, gateway: dict | None, shard: dict | None) -> None:
    print("MEASURED (fits over bench/results/load_scale_*.json):")
    for kind, s in (("streams", stream), ("gateways", gateway)):
        if s is None:
            print(f"  {kind}: runs missing (bench/scale_matrix.sh)")
            continue
        rates = ", ".join(f"{r:,.0f}" for r in s["rates_fixes_per_s"])
        print(f"  {kind}, 1/2/4 processes at {rates} fixes/s:")
        for key, title in SHOWN:
            value = s.get(key)
            shown = "n/a" if value is None else f"{value:.3f}"
            print(f"    {title:40s} {shown:>10s}")
    if shard is not None:
        ratio = shard["redis_ratio_3_to_1"]
        print(f"  Redis CPU per fix, 3 shards / 1 shard: {ratio:.2f}")
        for pair in shard["pairs"]:
            print(
                f"    {pair['kind']}, {pair['workers']} process(es): "
                f"{pair['redis_us_per_fix_1_shard']} -> "
                f"{pair['redis_us_per_fix_3_shards']} µs/fix; shard cores "
                f"{pair['shard_cores']}"
            )
    else:
        print("  sharding: the 3-shard runs are missing")
    print("ASSUMED:")
    for key, value in ASSUMED.items():
        print(f"  {key:42s} {value!s:>10s}")


def show_runs(rows: list[dict]) -> None:
    print("\nScaled-down runs (CPU in cores and µs per fix; latency ack or batch):")
    print(
        "  run                      fixes/s  server  µs/fix  PG µs  Redis µs  "
        "KB/stream  p50 / p99 ms  errors lost"
    )
    for r in rows:
        p50, p99 = r["ack_p50_ms"], r["ack_p99_ms"]
        if p50 is None:
            p50, p99 = r["batch_p50_ms"], r["batch_p99_ms"]
        print(
            f"  {r['run']:24s} {r['fixes_per_s']:>7,.0f} {r['server_cores']:>7} "
            f"{r['server_us_per_fix']!s:>7} {r['pg_us_per_fix']!s:>6} "
            f"{r['redis_us_per_fix']!s:>8} {r['kb_per_stream']!s:>9}  "
            f"{p50!s:>6} / {p99!s:<7} {r['errors']} {r['fixes_lost']}"
        )


def all_rows() -> list[dict]:
    names = sorted(p.stem[len("load_") :] for p in RESULTS.glob("load_scale_*.json"))
    return [summary(data) for n in names if (data := load(n)) is not None]


def markdown(out: dict) -> None:
    """The tables of bench/README.md's capacity section, from this run."""
    print(
        "\n| run | fixes/s | server cores (per process) | µs CPU/fix | observer µs "
        "per fleet fix | PG µs/fix | Redis µs/fix (per shard cores) | KB/stream | "
        "p50 / p99 ms | errors / lost |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out["runs"]:
        p50, p99 = r["ack_p50_ms"], r["ack_p99_ms"]
        if p50 is None:
            p50, p99 = r["batch_p50_ms"], r["batch_p99_ms"]
        procs = r["process_cores"] or []
        per = " (" + ", ".join(f"{c:.2f}" for c in procs[1:]) + ")" if procs[1:] else ""
        shards = r["redis_shard_cores"]
        per_shard = " (" + ", ".join(f"{c:.3f}" for c in shards) + ")" if shards else ""
        latency = "–" if p50 is None else f"{p50:,.0f} / {p99:,.0f}"
        print(
            f"| `{r['run']}` | {r['fixes_per_s']:,.0f} | {r['server_cores']:.2f}{per} "
            f"| {r['server_us_per_fix']:,.0f} | {r['observer_us_per_fleet_fix']} | "
            f"{r['pg_us_per_fix']} | {r['redis_us_per_fix']}{per_shard} | "
            f"{r['kb_per_stream'] or '–'} | {latency} | {r['errors']} / "
            f"{r['fixes_lost']} |"
        )
    print(
        "\n| devices | fixes/s | server processes, streams | server processes, "
        "gateways | Redis shards | PostgreSQL cores / nodes (streams; gateways) | "
        "PostgreSQL TB/day | events/s, event stream partitions |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for p in out["plans"]:
        print(
            f"| {p['devices']:,} | {p['fixes_per_s']:,.0f} | "
            f"{_count(p['stream_processes'])} | {_count(p['gateway_processes'])}"
            f" | {p['redis_shards']:,} | {p['pg_cores_streams']:,} / "
            f"{p['pg_nodes_streams']}; {p['pg_cores_gateways']:,} / "
            f"{p['pg_nodes_gateways']} | {p['pg_tb_per_day']} | "
            f"{p['events_per_s']:,}, {p.get('event_stream_partitions', '–')} |"
        )


def _count(processes: int | None) -> str:
    return "cannot" if processes is None else f"{processes:,}"


def main() -> dict:
    stream = scaling(("streams", "streams10"))
    gateway = scaling(("gateway",), fixed_cores(stream) if stream is not None else None)
    shard = sharding()
    watch_us = watcher_cost_us()
    routed = routed_cost_us()
    event = event_cost_us()
    show_inputs(stream, gateway, shard)
    print(f"    {'watcher update, µs (timed here)':40s} {watch_us:>10.3f}")
    if event is None:
        print("  events: bench/results/event_store_bench.json lacks server CPU")
    else:
        print(f"    {'PostgreSQL µs per stored event':40s} {event['pg_us']:>10.1f}")
        print(
            f"    {'Redis µs per event on its stream':40s} {event['redis_us']:>10.1f}"
        )
    if routed is None:
        print("  routed delivery: bench/results/fanout_bench.json is missing")
    else:
        for key, value in routed.items():
            print(f"    {key:40s} {value:>10.1f}")
    rows = all_rows()
    show_runs(rows)
    plans = []
    if stream is not None and gateway is not None:
        delivered = 0.0 if routed is None else routed["us_per_delivered_update"]
        for s in (stream, gateway):
            s["per_fix_us"] = s["server_us_per_fix"] + ASSUMED["watch_fanout"] * (
                watch_us + delivered
            )
        plans = [plan(n, stream, gateway, shard, event) for n in FLEETS]
    print("\nAt one fix every 10 s ('cannot': what every process receives of the")
    print("whole fleet, measured by the observer, fills it):")
    print(
        "  devices | fixes/s | stream procs | gateway procs "
        "| Redis shards | PG cores / nodes, streams | PG TB/day"
    )
    for p in plans:
        print(
            f"  {p['devices']:>11,} | {p['fixes_per_s']:>10,.0f} | "
            f"{_count(p['stream_processes']):>6} | "
            f"{_count(p['gateway_processes']):>5} | "
            f"{p['redis_shards']:>4} | {p['pg_cores_streams']} / "
            f"{p['pg_nodes_streams']} | {p['pg_tb_per_day']}"
        )
    if plans:
        limit = plans[0]["stream_fleet_receive_limit_fixes_per_s"]
        print(f"  what a process receives of the fleet fills it at {limit} fixes/s")
    for p in plans:
        if "event_stream_partitions" in p:
            print(
                f"  {p['devices']:>11,} devices: {p['events_per_s']:,} events/s, "
                f"{p['event_stream_cores']} Redis cores on event streams: "
                f"event_stream_partitions >= {p['event_stream_partitions']}"
            )
    out = {
        "measured": {
            "streams": stream,
            "gateways": gateway,
            "sharding": shard,
            "watch_us_per_update": watch_us,
            "routed_delivery": routed,
            "event_costs_us": event,
        },
        "assumed": ASSUMED,
        "runs": rows,
        "plans": plans,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "capacity.json").write_text(json.dumps(out, indent=1) + "\n")
    print("wrote bench/results/capacity.json")
    if "--markdown" in sys.argv[1:]:
        markdown(out)
    return out


if __name__ == "__main__":
    main()
