"""The server's CPU per device-stream message, old code against new, round by round.

Starts a server on 127.0.0.1 (embedded store, or PostgreSQL + Redis with
``--production``) for each code checkout in turn, drives ``--streams`` Track streams
from a separate client process (Python grpc.aio, the same client for every side),
each sending a batch of one fix every ``--interval-s`` on an open-loop schedule, and
reports the server's CPU per message (utime + stime of the server from /proc over
the steady window, divided by the acks the client got in it) and the acks' latency
at the client. With ``--base`` the rounds alternate (base, head, base, head, ...)
and the table ends with head / base ratios. JSON goes to
bench/results/track_cost.json (or ``--json``).

The server of a checkout runs that checkout's code: ``python -m tracking_grpc`` with
its directory first on PYTHONPATH, whatever the virtual environment's editable
install points at. On a shared machine CPU time varies by 10 % from run to run;
``--callgrind`` runs the servers under valgrind instead and counts the instructions
they execute in the window, which other work on the machine does not change (use a
low rate: the server runs some 50 times slower, and its commits then batch as
timing has it, so counts still vary by several per cent; bench/README.md).

    flock /work/notes/bench.lock .venv/bin/python bench/track_cost.py \\
        --base ../old-checkout --streams 2000 --interval-s 2 --rounds 2
    flock /work/notes/bench.lock .venv/bin/python bench/track_cost.py \\
        --base ../old-checkout --callgrind --streams 50 --interval-s 2 \\
        --ramp-s 5 --settle-s 5 --steady-s 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "generated")]

from load import RESULTS, free_port, wait_serving  # noqa: E402
from load_backends import Production  # noqa: E402

from tracking_grpc.loadgen import procstat  # noqa: E402

STREAMS_PER_CHANNEL = 500


@dataclass
class Round:
    """One server run of one side."""

    side: str
    round: int
    messages: int = 0  # acks the client got in the steady window
    server_cpu_s: float = 0.0
    steady_s: float = 0.0
    client_cpu_s: float = 0.0
    machine_busy_cores: float = 0.0
    ack_p50_ms: float = 0.0
    ack_p99_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    instructions: int = 0  # with --callgrind: the server's, in the window

    @property
    def instructions_per_message(self) -> float:
        return self.instructions / max(self.messages, 1)

    @property
    def cpu_us_per_message(self) -> float:
        return self.server_cpu_s / max(self.messages, 1) * 1e6

    @property
    def server_cores(self) -> float:
        return self.server_cpu_s / max(self.steady_s, 1e-9)


# ---------------------------------------------------------------- the client


async def _client(args: argparse.Namespace) -> dict:
    import grpc
    from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc

    channels = [
        grpc.aio.insecure_channel(
            args.target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(-(-args.streams // STREAMS_PER_CHANNEL))
    ]
    stubs = [track_pb2_grpc.TrackSessionStub(c) for c in channels]
    start = time.time() + 0.5
    steady_from = start + args.ramp_s + args.settle_s
    steady_to = steady_from + args.steady_s
    latencies: list[float] = []
    errors: dict[str, int] = {}
    tag = f"{os.getpid()}-{int(time.time())}"
    rng = random.Random(1)

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def sleep_until(t: float) -> None:
        while (delay := t - time.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(delay)

    async def stream(i: int) -> None:
        await sleep_until(start + args.ramp_s * i / args.streams)
        call = stubs[i // STREAMS_PER_CHANNEL].Track()
        sent: list[float] = []
        device = f"cost-{tag}-{i}"
        lat, lon = 52.5 + rng.uniform(-0.05, 0.05), 13.4 + rng.uniform(-0.05, 0.05)

        async def read() -> None:
            async for response in call:
                if response.WhichOneof("message") != "ack":
                    continue
                now = time.time()
                sent_at = sent.pop(0) if sent else now
                if steady_from <= now < steady_to:
                    latencies.append(now - sent_at)
                if response.ack.rejected:
                    error("rejected")

        try:
            hello = track_pb2.Hello(device_id=device)
            await call.write(track_pb2.TrackRequest(hello=hello))
            reader = asyncio.create_task(read())
            next_at = time.time() + rng.uniform(0, args.interval_s)
            seq = 0
            while next_at < steady_to + args.interval_s:
                await sleep_until(next_at)
                seq += 1
                fix = common_pb2.Fix(
                    seq=seq,
                    time_ms=int(next_at * 1000),
                    lat=lat,
                    lon=lon,
                    accuracy_m=5.0,
                    provider=common_pb2.PROVIDER_GNSS,
                )
                sent.append(time.time())
                batch = track_pb2.FixBatch(fixes=[fix])
                await call.write(track_pb2.TrackRequest(batch=batch))
                next_at += args.interval_s
            await call.done_writing()
            await reader
        except grpc.aio.AioRpcError as exc:
            error(exc.code().name)

    async def announce() -> None:
        await sleep_until(steady_from)
        print(json.dumps({"steady": "from", "t": time.time()}), flush=True)
        await sleep_until(steady_to)
        print(json.dumps({"steady": "to", "t": time.time()}), flush=True)

    marks = asyncio.create_task(announce())
    await asyncio.gather(*(stream(i) for i in range(args.streams)))
    await marks
    for channel in channels:
        await channel.close()
    return {"latencies_s": latencies, "errors": errors}


def client_main(args: argparse.Namespace) -> None:
    import uvloop

    result = uvloop.run(_client(args))
    lat = np.array(result["latencies_s"]) * 1000
    summary = {
        "acks": len(lat),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else 0.0,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else 0.0,
        "errors": result["errors"],
    }
    print(json.dumps({"result": summary}), flush=True)


# ---------------------------------------------------------------- the server


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(f) for f in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / procstat.TICKS_PER_S


def run_side(args: argparse.Namespace, side: str, root: Path, number: int) -> Round:
    production = None
    if args.production:
        production = Production(args.pg_admin_url, args.redis_url)
    data_dir = Path(tempfile.mkdtemp(prefix="track_cost_"))
    target = f"127.0.0.1:{free_port()}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "generated")])
    command = [
        *(_valgrind(data_dir) if args.callgrind else []),
        sys.executable,
        "-m",
        "tracking_grpc",
        "serve",
        "--listen",
        target,
        "--data-dir",
        str(data_dir),
        "--log-level",
        "WARNING",
        *(production.flags if production else []),
        *args.server_flag,
    ]
    if not args.no_metrics:  # as bench/load.py's servers: metrics on
        command.append(f"--metrics-listen=127.0.0.1:{free_port()}")
    log = open(data_dir / "server.log", "w")
    server = subprocess.Popen(
        command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    result = Round(side, number)
    try:
        wait_serving(target, server, timeout_s=180 if args.callgrind else 60)
        client = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client",
                "--target",
                target,
                *("--streams", str(args.streams)),
                *("--interval-s", str(args.interval_s)),
                *("--ramp-s", str(args.ramp_s)),
                *("--settle-s", str(args.settle_s)),
                *("--steady-s", str(args.steady_s)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        marks: dict[str, tuple[float, float, float, float]] = {}
        summary: dict = {}
        for line in client.stdout:
            message = json.loads(line)
            if "steady" in message:
                if args.callgrind:
                    _callgrind_control(message["steady"], server.pid)
                marks[message["steady"]] = (
                    time.monotonic(),
                    procstat.usage(server.pid).cpu_s,
                    procstat.usage(client.pid).cpu_s,
                    machine_busy_s(),
                )
            elif "result" in message:
                summary = message["result"]
        client.wait(timeout=120)
        if "from" not in marks or "to" not in marks or not summary:
            raise RuntimeError(f"the client ended with {client.returncode}")
        (t0, s0, c0, m0), (t1, s1, c1, m1) = marks["from"], marks["to"]
        result.steady_s = t1 - t0
        result.server_cpu_s = s1 - s0
        result.client_cpu_s = c1 - c0
        result.machine_busy_cores = (m1 - m0) / result.steady_s
        result.messages = summary["acks"]
        result.ack_p50_ms = summary["p50_ms"]
        result.ack_p99_ms = summary["p99_ms"]
        result.errors = summary["errors"]
        if args.callgrind:
            result.instructions = _window_instructions(data_dir)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()
        if production is not None:
            production.close()
    if server.returncode != 0:
        tail = (data_dir / "server.log").read_text().splitlines()[-20:]
        print(*tail, sep="\n")
    if args.keep_data:
        print(f"{side} round {number}: server files in {data_dir}")
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


def _valgrind(data_dir: Path) -> list[str]:
    """Run the server under callgrind, counting nothing until the window opens."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={data_dir / 'callgrind.out'}",
        "-q",
    ]


def _callgrind_control(mark: str, pid: int) -> None:
    """The window opens: count; it closes: dump what was counted in it."""
    flag = "--instr=on" if mark == "from" else "--dump=window"
    subprocess.run(
        ["callgrind_control", flag, str(pid)], check=True, capture_output=True
    )


def _window_instructions(data_dir: Path) -> int:
    """Instructions of the window's dump (the first; the server's exit dumps
    again, what came after the window)."""
    dumps = sorted(data_dir.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError("callgrind wrote no dump for the window")
    for line in dumps[0].read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction count in {dumps[0]}")


def _row(name: str, rounds: list[Round]) -> str:
    cpu = [r.cpu_us_per_message for r in rounds]
    return (
        f"| {name} | {len(rounds)} | {statistics.median(cpu):.0f} "
        f"({min(cpu):.0f}–{max(cpu):.0f}) "
        f"| {statistics.median(r.server_cores for r in rounds):.2f} "
        f"| {statistics.median(r.ack_p50_ms for r in rounds):.1f} "
        f"| {statistics.median(r.ack_p99_ms for r in rounds):.1f} "
        f"| {statistics.median(r.machine_busy_cores for r in rounds):.2f} |"
    )


def report(args: argparse.Namespace, rounds: list[Round]) -> dict:
    print()
    print(
        "| side | round | messages | server µs/message | server cores "
        "| ack p50 / p99 ms | client cores | machine busy | errors "
        "| instructions/message |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rounds:
        print(
            f"| {r.side} | {r.round} | {r.messages} | {r.cpu_us_per_message:.0f} "
            f"| {r.server_cores:.2f} | {r.ack_p50_ms:.1f} / {r.ack_p99_ms:.1f} "
            f"| {r.client_cpu_s / r.steady_s:.2f} | {r.machine_busy_cores:.2f} "
            f"| {r.errors or ''} | {r.instructions_per_message:,.0f} |"
        )
    sides = list(dict.fromkeys(r.side for r in rounds))
    print()
    print(
        "| side | rounds | µs/message median (min–max) | server cores "
        "| ack p50 ms | ack p99 ms | machine busy |"
    )
    print("|---|---|---|---|---|---|---|")
    for side in sides:
        print(_row(side, [r for r in rounds if r.side == side]))
    ratios: dict[str, object] = {}
    if len(sides) == 2:
        base, head = sides
        pairs = [
            (a, b)
            for a, b in zip(
                [r for r in rounds if r.side == base],
                [r for r in rounds if r.side == head],
                strict=False,
            )
        ]
        print()
        for name in ("cpu_us_per_message", "instructions_per_message"):
            per_round = [
                getattr(b, name) / getattr(a, name)
                for a, b in pairs
                if getattr(a, name)
            ]
            if not per_round:
                continue
            ratios[f"{name}_per_round"] = per_round
            ratios[f"{name}_median"] = statistics.median(per_round)
            print(
                f"{head} / {base}, {name}, round by round: "
                + ", ".join(f"{x:.3f}" for x in per_round)
                + f"; median {statistics.median(per_round):.3f}"
            )
    return {
        "args": {k: v for k, v in vars(args).items() if k != "client"},
        "rounds": [
            {
                **asdict(r),
                "cpu_us_per_message": r.cpu_us_per_message,
                "server_cores": r.server_cores,
                "instructions_per_message": r.instructions_per_message,
            }
            for r in rounds
        ],
        "ratios": ratios,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--streams", type=int, default=2000, help="Track streams")
    add(
        "--interval-s", type=float, default=2.0, help="seconds between a stream's fixes"
    )
    add("--ramp-s", type=float, default=10.0, help="streams open over this time")
    add("--settle-s", type=float, default=5.0, help="unmeasured, after the ramp")
    add("--steady-s", type=float, default=20.0, help="measured steady window")
    add("--rounds", type=int, default=1, help="runs of each side, alternating")
    add("--base", type=Path, help="a checkout of the old code (side 'base')")
    add("--head", type=Path, default=ROOT, help="the new code (side 'head')")
    add("--production", action="store_true", help="PostgreSQL + Redis backends")
    add("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    add("--redis-url", default="redis://127.0.0.1:6379/0")
    add("--server-flag", action="append", default=[], help="extra flag for serve")
    add(
        "--no-metrics",
        action="store_true",
        help="serve no Prometheus metrics (bench/load.py's servers do, and so do "
        "these by default)",
    )
    add(
        "--callgrind",
        action="store_true",
        help="run the servers under valgrind's callgrind and count their "
        "instructions in the window (repeatable on a busy machine; use a low rate: "
        "the server runs some 50 times slower)",
    )
    add(
        "--keep-data",
        action="store_true",
        help="keep each server's directory (its log, store and callgrind dumps)",
    )
    add("--json", type=Path, help="default bench/results/track_cost.json")
    # the client process's own flags
    add("--client", action="store_true", help=argparse.SUPPRESS)
    add("--target", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client and not (args.target or "").startswith("127.0.0.1:"):
        parser.error("the client needs a loopback --target")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.client:
        client_main(args)
        return
    sides = [("head", args.head.resolve())]
    if args.base is not None:
        sides.insert(0, ("base", args.base.resolve()))
    rounds = []
    for number in range(1, args.rounds + 1):
        for side, root in sides:
            result = run_side(args, side, root, number)
            print(
                f"{side} round {number}: {result.cpu_us_per_message:.0f} µs/message, "
                f"{result.messages} messages, ack p50 {result.ack_p50_ms:.1f} ms",
                flush=True,
            )
            rounds.append(result)
    out = report(args, rounds)
    path = args.json or RESULTS / "track_cost.json"
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
