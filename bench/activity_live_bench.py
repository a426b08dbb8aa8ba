"""Live activity: the cost of one small processor call against a large fleet.

A device stream's group commit hands the activity processor a few fixes of a few
devices while the tails of every other device stay in memory. This program fills
the tails of ``--devices`` devices (one fix every 5 s, half moving, half parked),
then times calls of ``--fixes`` fixes, and as the peer the same fixes given in
whole-fleet calls (the per-fix cost when nothing is small). Prints a table and
writes bench/results/activity_live_bench.json.

    .venv/bin/python bench/activity_live_bench.py [--devices 10000] [--fixes 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from tracking_grpc.activity.processor import ActivityProcessor
from tracking_grpc.core.fixes import FixBatch

START_MS = 1_767_225_600_000
INTERVAL_MS = 5_000


class Fleet:
    """Devices sending a fix every 5 s: half drive north, half jitter in place."""

    def __init__(self, devices: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.lat0 = 47 + self.rng.uniform(-0.1, 0.1, devices)
        self.lon0 = 8 + self.rng.uniform(-0.1, 0.1, devices)
        self.moving = self.rng.random(devices) < 0.5
        self.names = np.array([f"d{i}" for i in range(devices)], dtype=object)

    def batch(self, index: np.ndarray, round_: int) -> FixBatch:
        t = START_MS + round_ * INTERVAL_MS + index.astype(np.int64) // 2
        drift = self.rng.normal(0, 5, index.size) / 111_195
        lat = self.lat0[index] + np.where(
            self.moving[index], round_ * 50 / 111_195, drift
        )
        return FixBatch.from_columns(
            "bench",
            self.names[index],
            np.full(index.size, round_ + 1),
            t,
            lat,
            self.lon0[index],
            accuracy_m=np.full(index.size, 5.0),
            received_ms=t,
        )


def run(devices: int, fixes: int, calls: int, warm_rounds: int) -> dict:
    fleet = Fleet(devices)
    processor = ActivityProcessor()
    everyone = np.arange(devices)
    whole = []
    for round_ in range(warm_rounds):
        started = time.perf_counter()
        processor.apply(fleet.batch(everyone, round_), created_ms=0)
        whole.append(time.perf_counter() - started)
    tail_rows = len(processor._tenants["bench"].tail)
    small = []
    for call in range(calls):
        index = np.arange(call * fixes, (call + 1) * fixes) % devices
        round_ = warm_rounds + (call * fixes) // devices
        started = time.perf_counter()
        processor.apply(fleet.batch(index, round_), created_ms=0)
        small.append(time.perf_counter() - started)
    whole_steady = float(np.mean(whole[-10:]))
    return {
        "devices": devices,
        "fixes_per_small_call": fixes,
        "tail_rows": tail_rows,
        "small_call_ms_p50": round(float(np.median(small)) * 1000, 2),
        "small_call_ms_mean": round(float(np.mean(small)) * 1000, 2),
        "small_call_us_per_fix": round(float(np.mean(small)) / fixes * 1e6, 1),
        "whole_fleet_call_ms": round(whole_steady * 1000, 1),
        "whole_fleet_us_per_fix": round(whole_steady / devices * 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--fixes", type=int, default=10)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--warm-rounds", type=int, default=80)
    args = parser.parse_args()
    result = run(args.devices, args.fixes, args.calls, args.warm_rounds)
    print(
        f"{'devices':>8} {'tail rows':>10} {'small call ms p50/mean':>24} "
        f"{'µs/fix small':>13} {'µs/fix whole fleet':>19}"
    )
    print(
        f"{result['devices']:>8} {result['tail_rows']:>10} "
        f"{result['small_call_ms_p50']:>11} / {result['small_call_ms_mean']:<10} "
        f"{result['small_call_us_per_fix']:>13} {result['whole_fleet_us_per_fix']:>19}"
    )
    result["machine"] = {"python": platform.python_version()}
    out = Path(__file__).parent / "results" / "activity_live_bench.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
