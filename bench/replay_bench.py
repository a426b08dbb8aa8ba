"""Replay the AIS hour through a real server process, one client mode against another.

    .venv/bin/python bench/replay_bench.py

The New York Harbor AIS hour (8,689 fixes, 295 vessels) is replayed with ``--fast``
into a fresh server (embedded SQLite store, separate process) per run: one ``Track``
stream per vessel with 1, 10 and 100 fixes per message, and columnar
``PublishBatch`` calls of 1,000 fixes (a gateway). Each mode runs ``ROUNDS`` times,
alternating; the median is reported. Every run checks that each fix was stored
once. Prints a table and writes bench/results/replay_bench.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tracking_grpc.client.channel import open_channel, tracking_stub
from tracking_grpc.client.replay import ReplayOptions, publish_trace, replay_trace
from tracking_grpc.client.schedule import Pace
from tracking_grpc.traces import read_trace

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "replay_bench.json"
SHARED = Path(os.environ.get("TRACKING_SHARED_DIR", ROOT.parent / "shared"))
AIS = SHARED / "data" / "traces" / "nyharbor_ais_2020-06-30_first_hour.csv"
ROUNDS = 3
MODES = [("track", 1), ("track", 10), ("track", 100), ("publish", 1000)]
STORED = 8687  # two of the 8,689 reports repeat a vessel's time


def start_server(data_dir: str) -> tuple[subprocess.Popen, int]:
    """A server process on a free loopback port; returns it and its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tracking_grpc", "serve", "--listen", "127.0.0.1:0",
         "--data-dir", data_dir, "--log-level", "INFO"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = process.stderr
    if log is None:  # stderr=PIPE above, so only a broken Popen gets here
        process.kill()
        raise RuntimeError("server stderr is not a pipe")
    deadline = time.monotonic() + 30
    for line in log:
        found = re.search(r"listening on .* \(port (\d+)\)", line)
        if found:
            # Keep reading the log so that a full pipe never stalls the server.
            threading.Thread(target=log.read, daemon=True).start()
            return process, int(found.group(1))
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError("server did not report its port")


async def replay_once(port: int, mode: str, batch_fixes: int, trace) -> dict:
    options = ReplayOptions(pace=Pace(fast=True), batch_fixes=batch_fixes, tick_ms=1)
    async with open_channel(f"127.0.0.1:{port}") as channel:
        stub = tracking_stub(channel)
        if mode == "publish":
            report = await publish_trace(stub, trace, options)
        else:
            report = await replay_trace(stub, trace, options)
    stored = report.total("stored")
    if stored != STORED or report.failed():
        raise RuntimeError(f"{mode}/{batch_fixes}: stored {stored}, expected {STORED}")
    return {"elapsed_s": report.elapsed_s, "fixes_per_s": len(trace) / report.elapsed_s}


def run_mode(mode: str, batch_fixes: int, trace) -> dict:
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as data_dir:
        process, port = start_server(data_dir)
        try:
            return asyncio.run(replay_once(port, mode, batch_fixes, trace))
        finally:
            process.terminate()
            process.wait(timeout=30)


def main() -> None:
    trace = read_trace(AIS)
    samples: dict[tuple[str, int], list[dict]] = {key: [] for key in MODES}
    for _ in range(ROUNDS):
        for mode, batch_fixes in MODES:
            samples[(mode, batch_fixes)].append(run_mode(mode, batch_fixes, trace))

    rows = []
    for (mode, batch_fixes), runs in samples.items():
        rows.append(
            {
                "mode": mode,
                "fixes_per_message": batch_fixes,
                "fixes": len(trace),
                "devices": len(trace.devices()),
                "median_elapsed_s": statistics.median(r["elapsed_s"] for r in runs),
                "median_fixes_per_s": statistics.median(r["fixes_per_s"] for r in runs),
                "runs": runs,
            }
        )
    print(f"{'mode':<8} {'fixes/msg':>9} {'elapsed s':>10} {'fixes/s':>9}")
    for row in rows:
        print(
            f"{row['mode']:<8} {row['fixes_per_message']:>9} "
            f"{row['median_elapsed_s']:>10.2f} {row['median_fixes_per_s']:>9.0f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rounds": ROUNDS,
    }
    RESULTS.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
