"""The replay client rides out a server outage longer than a burst of retries.

A real server on port 0 is stopped while ``tracking replay`` runs and restarted on the
same port and data dir a while later. Full-jitter backoff can spend many attempts in
a short outage, so the client must bound its retrying by time, not by attempts.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
from tracking.v1 import track_pb2_grpc

from tracking_grpc.client.commands import add_client_parsers
from tracking_grpc.client.session import DeviceSession, RetryPolicy

TENANT = "default"
DEVICES = ("bus-1", "bus-2", "bus-3")
FIXES = 30  # per device, one a second: 3 s of replay at --speed 10
OUTAGE_S = 2.0  # far longer than ten waits of at most 0.05 s
FAST = RetryPolicy(initial_s=0.01, max_s=0.05)


def write_trace(path: Path) -> Path:
    rows = ["device,time,lat,lon"]
    start_s = 1_750_000_000
    for i, device in enumerate(DEVICES):
        for k in range(FIXES):
            rows.append(f"{device},{start_s + k},{60.1 + i / 100},{24.9 + k / 1e4}")
    path.write_text("\n".join(rows) + "\n")
    return path


def replay_args(trace: Path, port: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tracking")
    add_client_parsers(parser.add_subparsers(required=True))
    return parser.parse_args(
        [
            "replay",
            str(trace),
            "--format",
            "csv",
            "--device-column",
            "device",
            "--time-column",
            "time",
            "--lat-column",
            "lat",
            "--lon-column",
            "lon",
            "--time-format",
            "unix_s",
            "--speed",
            "10",
            "--target",
            f"127.0.0.1:{port}",
        ]
    )


def fast_backoff(monkeypatch) -> None:
    """The CLI's policy keeps its limits but waits at most 0.05 s between tries."""
    full_jitter = RetryPolicy.delay_s
    monkeypatch.setattr(
        RetryPolicy, "delay_s", lambda _self, attempt: full_jitter(FAST, attempt)
    )


async def test_replay_survives_a_restart_longer_than_ten_attempts(
    start_server, tmp_path, monkeypatch, capsys
):
    fast_backoff(monkeypatch)
    trace = write_trace(tmp_path / "buses.csv")
    first = await start_server()
    args = replay_args(trace, first.port)
    replay = asyncio.create_task(args.command(args))
    await asyncio.sleep(0.5)
    await first.stop(0)
    await asyncio.sleep(OUTAGE_S)
    second = await start_server(listen=f"127.0.0.1:{first.port}")
    exit_code = await asyncio.wait_for(replay, timeout=60)

    out = capsys.readouterr().out
    assert exit_code == 0, out
    assert "FAILED" not in out
    for device in DEVICES:
        batch = await second.app.history.history(TENANT, device, 0, 2**62)
        assert sorted(batch.seq.tolist()) == list(range(1, FIXES + 1)), device
    assert await second.app.history.count(TENANT) == len(DEVICES) * FIXES


async def test_a_device_gives_up_when_the_server_stays_down(start_server):
    server = await start_server()
    port = server.port
    await server.stop(0)
    feed: asyncio.Queue = asyncio.Queue()
    feed.put_nowait([])
    retry = RetryPolicy(initial_s=0.01, max_s=0.05, give_up_s=0.5)
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        started = loop.time()
        stats = await DeviceSession(stub, "bus-1", feed, retry=retry).run()
    assert 0.5 <= loop.time() - started < 5.0
    assert (
        stats.error.startswith("gave up after") and "without a session" in stats.error
    )
    assert stats.reconnects > 10  # more tries than the old limit, all within 0.5 s
