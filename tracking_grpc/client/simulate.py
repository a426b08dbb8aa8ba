"""``simulate``: N synthetic vehicles, one ``Track`` stream each, for a bounded time.

Every ``--interval`` seconds each vehicle reports a fix stamped with the current
time; after ``--duration`` seconds the streams drain and a summary is printed. The
vehicles' sequence numbers start at the run's start time in milliseconds, so a
later run with the same device ids goes on after an earlier one instead of being
taken for its resends.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from tracking.v1 import common_pb2, track_pb2_grpc

from tracking_grpc.client.channel import (
    add_connection_arguments,
    call_metadata,
    open_channel,
    saying_when_unreachable,
    tracking_stub,
)
from tracking_grpc.client.flags import positive_float, positive_int
from tracking_grpc.client.fleet import SyntheticFleet
from tracking_grpc.client.report import ReplayReport
from tracking_grpc.client.session import GIVE_UP_S, DeviceSession, Feed

MAX_DEVICES = 20_000
MAX_DURATION_S = 24 * 3600.0
HELSINKI_CENTRE = (60.1699, 24.9384)


async def simulate(
    stub: track_pb2_grpc.TrackSessionStub,
    fleet: SyntheticFleet,
    *,
    interval_s: float,
    duration_s: float,
    prefix: str = "sim-",
    metadata: tuple[tuple[str, str], ...] = (),
    window: int = 8,
) -> ReplayReport:
    """Drive ``fleet`` for ``duration_s`` seconds, one fix per vehicle per interval."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    devices = [f"{prefix}{i:04d}" for i in range(fleet.n)]
    feeds: list[Feed] = [asyncio.Queue() for _ in devices]
    sessions = [
        DeviceSession(stub, device, feed, metadata=metadata, window=window)
        for device, feed in zip(devices, feeds, strict=True)
    ]
    runs = [asyncio.create_task(session.run()) for session in sessions]

    ticks = max(1, int(duration_s / interval_s))
    first_seq = time.time_ns() // 1_000_000
    for tick in range(ticks):
        fixes = fleet.step(interval_s)
        time_ms = time.time_ns() // 1_000_000
        for i, feed in enumerate(feeds):
            fix = common_pb2.Fix(
                seq=first_seq + tick,
                time_ms=time_ms,
                lat=float(fixes.lat[i]),
                lon=float(fixes.lon[i]),
                accuracy_m=float(fixes.accuracy_m[i]),
                speed_mps=float(fixes.speed_mps[i]),
                heading_deg=float(fixes.heading_deg[i]),
                provider=common_pb2.PROVIDER_GNSS,
            )
            feed.put_nowait([fix])
        await asyncio.sleep(max(0.0, start + (tick + 1) * interval_s - loop.time()))
    for feed in feeds:
        feed.put_nowait(None)

    report = ReplayReport(fixes=ticks * fleet.n, offset_ms=0)
    report.sessions = list(await asyncio.gather(*runs))
    report.elapsed_s = loop.time() - start
    return report


def _centre(text: str) -> tuple[float, float]:
    try:
        lat, lon = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAT,LON, got {text!r}") from None
    return lat, lon


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate", help="drive N synthetic devices (demos, load)", description=__doc__
    )
    parser.add_argument(
        "--devices", type=positive_int, default=10, help="how many vehicles"
    )
    parser.add_argument(
        "--interval", type=positive_float, default=1.0, help="seconds per fix"
    )
    parser.add_argument(
        "--duration", type=positive_float, default=60.0, help="seconds to run"
    )
    parser.add_argument(
        "--center", type=_centre, default=HELSINKI_CENTRE, help="LAT,LON of the area"
    )
    parser.add_argument("--radius-m", type=positive_float, default=2000.0)
    parser.add_argument("--prefix", default="sim-", help="device id prefix")
    parser.add_argument("--seed", type=int, help="random seed (repeatable runs)")
    add_connection_arguments(parser)
    parser.set_defaults(command=run)
    return parser


async def run(args: argparse.Namespace) -> int:
    if not 1 <= args.devices <= MAX_DEVICES:
        raise SystemExit(f"--devices must be between 1 and {MAX_DEVICES}")
    if not (0 < args.interval <= args.duration <= MAX_DURATION_S):
        raise SystemExit(f"need 0 < --interval <= --duration <= {MAX_DURATION_S:.0f}")
    fleet = SyntheticFleet(args.devices, args.center, args.radius_m, args.seed)
    async with (
        open_channel(args.target) as channel,
        saying_when_unreachable(channel, args.target, GIVE_UP_S),
    ):
        report = await simulate(
            tracking_stub(channel),
            fleet,
            interval_s=args.interval,
            duration_s=args.duration,
            prefix=args.prefix,
            metadata=call_metadata(args.token),
        )
    print(report.summary(f"simulated {args.devices} devices"))
    return report.exit_code()
