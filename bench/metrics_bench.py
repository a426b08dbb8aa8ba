"""Cost of metrics per fix: the recording calls the ingest path makes, on and off.

    .venv/bin/python bench/metrics_bench.py

Part 1 times the recording calls the server makes for one message of fixes on a
stream, for one unary call, and for one group commit, with metrics off and on, and
divides by the fixes. Part 2 runs a real server (``tracking serve``, embedded store)
in a subprocess with metrics off and on, alternately, sends the same fixes over Track
streams (messages of 1 and 10 fixes), and reads the server's CPU time per fix from
/proc (median of alternating runs). Part 1 is the precise number; part 2 checks it
end to end but moves by ±15 % on a shared machine. Prints a table and writes
bench/results/metrics_bench.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc

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


STREAMS = 10
MESSAGES_PER_STREAM = 1_000
RUNS = 5


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_ready(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)


async def device_stream(
    stub: track_pb2_grpc.TrackSessionStub, device: str, fixes_per_message: int
) -> None:
    start_ms = time.time_ns() // 1_000_000 - 3_600_000
    call = stub.Track()
    await call.write(track_pb2.TrackRequest(hello=track_pb2.Hello(device_id=device)))
    await call.read()
    seq = 0
    for _ in range(MESSAGES_PER_STREAM):
        fixes = []
        for _ in range(fixes_per_message):
            seq += 1
            fixes.append(
                common_pb2.Fix(
                    seq=seq, time_ms=start_ms + seq * 100, lat=41.15, lon=-8.61
                )
            )
        await call.write(track_pb2.TrackRequest(batch=track_pb2.FixBatch(fixes=fixes)))
        await call.read()
    await call.done_writing()
    await call.read()


async def drive(address: str, fixes_per_message: int, tag: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        await asyncio.gather(
            *(
                device_stream(stub, f"{tag}-{i}", fixes_per_message)
                for i in range(STREAMS)
            )
        )
    return STREAMS * MESSAGES_PER_STREAM * fixes_per_message


def server_cpu_per_fix_ns(metrics_on: bool, fixes_per_message: int, tag: str) -> float:
    """Start a server, drive it, return its CPU nanoseconds per fix (after startup)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="metrics-bench-") as data_dir:
        env = {
            **os.environ,
            "TRACKING_LISTEN": address,
            "TRACKING_DATA_DIR": data_dir,
            "TRACKING_SQLITE_SYNCHRONOUS": "NORMAL",
            "TRACKING_LOG_LEVEL": "ERROR",
            "TRACKING_METRICS_LISTEN": f"127.0.0.1:{free_port()}" if metrics_on else "",
        }
        command = [sys.executable, "-m", "tracking_grpc", "serve"]
        server = subprocess.Popen(command, env=env)
        try:
            asyncio.run(wait_ready(address))
            time.sleep(0.5)
            before = cpu_seconds(server.pid)
            fixes = asyncio.run(drive(address, fixes_per_message, tag))
            time.sleep(0.1)
            used = cpu_seconds(server.pid) - before
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    return used * 1e9 / fixes


def server_rows() -> list[dict]:
    """Median over alternating runs; every sample is kept in the JSON."""
    rows = []
    for fixes_per_message in (1, 10):
        samples: dict[bool, list[float]] = {False: [], True: []}
        for run in range(RUNS):
            for metrics_on in (False, True):
                tag = f"r{run}-{'on' if metrics_on else 'off'}"
                samples[metrics_on].append(
                    server_cpu_per_fix_ns(metrics_on, fixes_per_message, tag)
                )
        off, on = statistics.median(samples[False]), statistics.median(samples[True])
        rows.append(
            {
                "part": "server",
                "path": "Track stream",
                "fixes": fixes_per_message,
                "off_ns_per_fix": off,
                "on_ns_per_fix": on,
                "added_ns_per_fix": on - off,
                "added_percent": 100 * (on - off) / off,
                "off_samples_ns_per_fix": samples[False],
                "on_samples_ns_per_fix": samples[True],
            }
        )
    return rows


def main() -> None:
    rows = []
    for path, record in PATHS.items():
        for fixes in (1, 10, 100):
            rows.append(recording_row(path, record, fixes))
    rows.append(recording_row("group commit", group_commit, 1000))
    rows.extend(server_rows())
    header = ("part", "path", "fixes", "off ns/fix", "on ns/fix", "added", "added %")
    print("{:<10} {:<15} {:>6} {:>11} {:>10} {:>9} {:>8}".format(*header))
    for row in rows:
        print(
            f"{row['part']:<10} {row['path']:<15} {row['fixes']:>6} "
            f"{row['off_ns_per_fix']:>11.1f} {row['on_ns_per_fix']:>10.1f} "
            f"{row['added_ns_per_fix']:>9.1f} {_percent(row['added_percent']):>8}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "python": platform.python_version(),
                "load_average_1m": os.getloadavg()[0],
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


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
        "added_percent": None,  # relative to a no-op: not meaningful
    }


if __name__ == "__main__":
    main()
