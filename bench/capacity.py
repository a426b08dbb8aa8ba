"""Capacity model: server processes, Redis shards and PostgreSQL nodes for N devices.

Every input is either MEASURED (read from a load run in bench/results, or timed here
in the same run) or ASSUMED (a stated planning figure). The model prints both, then
what 1 million and 100 million devices at one fix every 10 s need, and writes
bench/results/capacity.json.

    .venv/bin/python bench/capacity.py
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
}


def load(name: str) -> dict | None:
    path = RESULTS / f"load_{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


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


def measured_inputs() -> tuple[dict, dict]:
    """Inputs from the load runs; where a run is missing, the input says so."""
    values: dict[str, float | None] = {}
    sources: dict[str, str] = {}

    def take(key: str, run: str, pick) -> None:
        data = load(run)
        values[key] = pick(data) if data else None
        sources[key] = f"bench/results/load_{run}.json" if data else "missing run"

    take(
        "stream_us_per_fix",
        "streams_10k_embedded",
        lambda d: d["server"]["cpu_us_per_fix"],
    )
    take(
        "stream_us_per_fix_production",
        "streams_10k_production",
        lambda d: d["server"]["cpu_us_per_fix"],
    )
    take(
        "kb_per_stream",
        "streams_10k_embedded",
        lambda d: d["server"]["rss_kb_per_stream"],
    )
    take(
        "gateway_us_per_fix",
        "gateway_8k_production",
        lambda d: d["server"]["cpu_us_per_fix"],
    )

    def backend_us(name: str):
        def pick(d: dict) -> float | None:
            fixes_per_s = d["fixes_in_window"] / d["args"]["steady_s"]
            cores = d.get("backend_cpu_cores", {}).get(name)
            return None if cores is None else cores / fixes_per_s * 1e6

        return pick

    take("pg_us_per_fix", "gateway_8k_production", backend_us("postgres"))
    take("redis_us_per_fix", "gateway_8k_production", backend_us("redis-server"))
    values["watch_us_per_update"] = watcher_cost_us()
    sources["watch_us_per_update"] = "timed here: convert.positions + serialise"
    return values, sources


def plan(devices: int, m: dict, a: dict) -> dict:
    """Processes, shards and nodes for ``devices`` streaming one fix per interval."""
    rate = devices / FIX_INTERVAL_S
    util = a["core_utilisation"]
    stream_us = m["stream_us_per_fix_production"] or m["stream_us_per_fix"]
    per_fix_us = stream_us + a["watch_fanout"] * m["watch_us_per_update"]
    cpu_processes = rate * per_fix_us / 1e6 / util
    memory_processes = (
        devices * m["kb_per_stream"] / (a["server_process_memory_gb"] * 2**20)
    )
    gateway_processes = rate * m["gateway_us_per_fix"] / 1e6 / util
    redis_cpu = (
        rate * (m["redis_us_per_fix"] or 0) / 1e6 / util / a["redis_shard_cores"]
    )
    redis_memory = (
        devices * a["redis_bytes_per_device"] / (a["redis_shard_memory_gb"] * 2**30)
    )
    pg_cores = rate * (m["pg_us_per_fix"] or 0) / 1e6 / util
    daily_tb = rate * 86_400 * a["pg_bytes_per_fix"] / 1e12
    return {
        "devices": devices,
        "fixes_per_s": rate,
        "stream_server_processes": math.ceil(max(cpu_processes, memory_processes)),
        "stream_processes_by_cpu": round(cpu_processes, 1),
        "stream_processes_by_memory": round(memory_processes, 1),
        "gateway_server_processes": math.ceil(gateway_processes),
        "redis_shards": math.ceil(max(redis_cpu, redis_memory, 1)),
        "pg_cores": round(pg_cores, 1),
        "pg_nodes": math.ceil(pg_cores / a["pg_node_cores"]) if pg_cores else None,
        "pg_tb_per_day": round(daily_tb, 2),
        "pg_partitions": a["retention_days"],
        "pg_tb_retained": round(daily_tb * a["retention_days"], 1),
    }


def scaling_runs() -> list[dict]:
    """The scaled-down runs on this machine that the extrapolation leans on."""
    rows = []
    for name in ("gateway_8k_production", "gateway_8k_production_2workers"):
        data = load(name)
        if data:
            rows.append(
                {
                    "run": name,
                    "processes": data["server"]["processes"],
                    "fixes_stored": data["counts"].get("fixes_stored", 0),
                    "batch_p50_ms": data["batch"].get("p50_ms"),
                    "server_us_per_fix": data["server"]["cpu_us_per_fix"],
                }
            )
    return rows


def main() -> dict:
    measured, sources = measured_inputs()
    missing = [k for k, v in measured.items() if v is None]
    print("Inputs (MEASURED unless marked):")
    for key, value in measured.items():
        shown = "n/a" if value is None else f"{value:.1f}"
        print(f"  {key:32s} {shown:>10s}  {sources[key]}")
    for key, value in ASSUMED.items():
        print(f"  {key:32s} {value!s:>10s}  ASSUMED")
    if missing:
        print(f"missing inputs (run bench/load.py first): {missing}")
    plans = [plan(n, measured, ASSUMED) for n in FLEETS] if not missing else []
    header = ["devices", "fixes/s", "stream procs", "gateway procs", "redis shards"]
    header += ["PG cores", "PG nodes", "PG TB/day"]
    print("\n" + " | ".join(header))
    for p in plans:
        print(
            f"{p['devices']:>11,} | {p['fixes_per_s']:>10,.0f} | "
            f"{p['stream_server_processes']:>6} | {p['gateway_server_processes']:>6} | "
            f"{p['redis_shards']:>4} | {p['pg_cores']:>7} | {p['pg_nodes']} | "
            f"{p['pg_tb_per_day']}"
        )
    scaling = scaling_runs()
    print("\nScaled-down runs here (same offered load, 1 and 2 server processes):")
    for row in scaling:
        print(f"  {row}")
    out = {
        "measured": measured,
        "sources": sources,
        "assumed": ASSUMED,
        "plans": plans,
        "scaling_runs": scaling,
        "not_measured_here": [
            "Redis Cluster with 3 shards (no cluster on this machine): shard counts "
            "scale the measured single-Redis CPU per fix linearly",
            "4 server processes: the machine has 2 cores shared with the driver",
        ],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "capacity.json").write_text(json.dumps(out, indent=1) + "\n")
    print("wrote bench/results/capacity.json")
    return out


if __name__ == "__main__":
    main()
