"""Server memory held by clients that never read: Watch and Track streams.

    .venv/bin/python bench/slow_readers.py [--devices 24000] [--watchers 100]
        [--tracks 100] [--server-arg=--write-timeout-s=5 ...]

Starts a server of its own (embedded store, a temporary directory, a free loopback
port), gives one tenant ``--devices`` live positions (PublishBatch), then:

1. opens ``--watchers`` whole-tenant Watch streams, each on its own connection,
   whose client never reads: the server's resident memory once the writes have
   stalled, and again after ``--hold-s`` (longer than the server's write timeout,
   when it has one); then as many again (memory freed is reused before the RSS
   shrinks, so this second wave shows whether the first one's is still held);
2. closes them, then opens ``--tracks`` Track streams that send ``--batches``
   batches of ``--fixes`` fixes each as fast as the server takes them and never
   read an ack: the memory after the sends stalled and after ``--hold-s``. Every
   fix is rejected (latitude 95), so nothing is stored and each ack is large (a
   rejection per fix, about 60 KB at 1,000 fixes): the acks fill the client's
   window after a few dozen batches.

The peer in the same run is the server idle with the tenant loaded. The server
runs the code of this checkout: run it on two commits to compare them. Prints a
table and writes JSON (``--out``, default bench/results/slow_readers.json).

A whole-tenant snapshot of 24,000 devices (about 1.7 MB) fits in the window a
client's gRPC grows for it, so those watches do not stall: what they keep is the
server's record of what each was sent. At 100,000 devices the snapshot outgrows the
window and the writes stall until ``write_timeout_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "generated")]

from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "slow_readers.json"
LOAD_CHUNK = 10_000
# One connection per client: streams sharing a connection share its window.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def settled_rss(pid: int, quiet_s: float = 3.0, limit_s: float = 60.0) -> float:
    """The server's RSS once it has not grown by 1 MB for ``quiet_s``."""
    start = time.monotonic()
    best = rss_mb(pid)
    since = time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - start < limit_s:
        await asyncio.sleep(0.5)
        now = rss_mb(pid)
        if now > best + 1:
            best, since = now, time.monotonic()
    return rss_mb(pid)


async def serving(target: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)


async def load_tenant(target: str, devices: int) -> None:
    now = time.time_ns() // 1_000_000
    async with grpc.aio.insecure_channel(target) as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        for start in range(0, devices, LOAD_CHUNK):
            ids = [
                f"veh-{i:06d}" for i in range(start, min(start + LOAD_CHUNK, devices))
            ]
            columns = track_pb2.ColumnarFixes(
                device_ids=ids,
                device_index=list(range(len(ids))),
                seq=[1] * len(ids),
                time_ms=[now - 1_000] * len(ids),
                lat=[50 + (i % 1000) / 1000 for i in range(len(ids))],
                lon=[10 + (i // 1000) / 1000 for i in range(len(ids))],
            )
            request = track_pb2.PublishBatchRequest(columns=columns)
            await stub.PublishBatch(request, timeout=120)


async def silent_watches(target: str, count: int) -> list[grpc.aio.Channel]:
    """``count`` whole-tenant watches whose client never reads."""
    channels = []
    for _ in range(count):
        channel = grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
        channels.append(channel)
        call = track_pb2_grpc.TrackSessionStub(channel).Watch(track_pb2.WatchRequest())
        await call.wait_for_connection()
    return channels


async def silent_track(
    target: str, device: str, batches: int, fixes: int
) -> tuple[grpc.aio.Channel, asyncio.Task]:
    """A Track stream that sends its batches (as far as the server takes them) in
    the background and never reads an ack."""
    channel = grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
    call = track_pb2_grpc.TrackSessionStub(channel).Track()
    now = time.time_ns() // 1_000_000

    async def send() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await call.write(track_pb2.TrackRequest(hello={"device_id": device}))
            for b in range(batches):
                rows = [
                    common_pb2.Fix(
                        seq=b * fixes + i + 1,
                        time_ms=now - 600_000 + b * fixes + i,
                        lat=95.0,
                        lon=-0.1,
                    )
                    for i in range(fixes)
                ]
                await call.write(track_pb2.TrackRequest(batch={"fixes": rows}))

    return channel, asyncio.create_task(send())


async def close_all(
    channels: list[grpc.aio.Channel], senders: Sequence[asyncio.Task] = ()
) -> None:
    for sender in senders:
        sender.cancel()
    for channel in channels:
        await channel.close(grace=None)


def run(args: argparse.Namespace) -> dict:
    """Start the server, measure it, stop it."""
    target = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="slow-readers-") as data_dir:
        command = [
            sys.executable,
            "-m",
            "tracking_grpc",
            "serve",
            f"--listen={target}",
            f"--data-dir={data_dir}",
            "--log-level=WARNING",
            *args.server_arg,
        ]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'generated'}"}
        log_path = Path(data_dir) / "server.log"
        with log_path.open("w") as log:
            server = subprocess.Popen(command, env=env, stderr=log, cwd=ROOT)
            try:
                rows = asyncio.run(measure(args, target, server.pid))
            finally:
                server.terminate()
                server.wait(timeout=60)
        text = log_path.read_text()
    errors = [
        line for line in text.splitlines() if "Traceback" in line or "ERROR" in line
    ]
    loaded = rows["tenant loaded (peer)"]
    return {
        "devices": args.devices,
        "watchers": args.watchers,
        "tracks": args.tracks,
        "batches": args.batches,
        "fixes": args.fixes,
        "hold_s": args.hold_s,
        "server_args": args.server_arg,
        "rss_mb": rows,
        "server_error_lines": len(errors),
        "server_error_examples": errors[:5],
        "watch_mb_each": (rows["watches stalled"] - loaded) / max(args.watchers, 1),
        "second_wave_mb_each": (
            rows["second wave stalled"] - rows["watches after hold"]
        )
        / max(args.watchers, 1),
        "track_mb_each": (rows["tracks after hold"] - rows["watches closed"])
        / max(args.tracks, 1),
    }


async def measure(args: argparse.Namespace, target: str, pid: int) -> dict:
    """The server's RSS (MB) at each step."""
    await serving(target)
    rows = {"started": await settled_rss(pid)}
    await load_tenant(target, args.devices)
    rows["tenant loaded (peer)"] = await settled_rss(pid)

    watches = await silent_watches(target, args.watchers)
    rows["watches stalled"] = await settled_rss(pid)
    await asyncio.sleep(args.hold_s)
    rows["watches after hold"] = await settled_rss(pid)
    # Memory a server frees is reused before its RSS shrinks: a second wave shows
    # whether the first one's is still held.
    watches += await silent_watches(target, args.watchers)
    rows["second wave stalled"] = await settled_rss(pid)
    await close_all(watches)
    rows["watches closed"] = await settled_rss(pid)

    tracks = [
        await silent_track(target, f"trk-{i:04d}", args.batches, args.fixes)
        for i in range(args.tracks)
    ]
    channels = [channel for channel, _ in tracks]
    rows["tracks stalled"] = await settled_rss(pid)
    await asyncio.sleep(args.hold_s)
    rows["tracks after hold"] = await settled_rss(pid)
    await close_all(channels, [sender for _, sender in tracks])
    rows["tracks closed"] = await settled_rss(pid)
    await serving(target)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=24_000)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--tracks", type=int, default=100)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--fixes", type=int, default=1_000)
    parser.add_argument("--hold-s", type=float, default=15.0)
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args)
    print(f"{'server state':32} {'RSS MB':>9}")
    for name, value in result["rss_mb"].items():
        print(f"{name:32} {value:9.1f}")
    print(f"(hold: {args.hold_s:g} s)")
    print(f"per stalled watch: {result['watch_mb_each']:.2f} MB")
    print(f"per watch of the second wave: {result['second_wave_mb_each']:.2f} MB")
    print(f"per stalled track: {result['track_mb_each']:.2f} MB")
    print(f"server log lines with ERROR or Traceback: {result['server_error_lines']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
