"""``replay FILE``: stream a recorded trace through the service as live devices.

Every device of the trace gets its own ``Track`` stream (all concurrently); fixes
due within the same tick go out as one batch. With ``--via publish`` the trace is
sent instead as columnar ``PublishBatch`` calls, as a gateway would.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from tracking.v1 import event_pb2, track_pb2, track_pb2_grpc

from tracking_grpc.client.channel import (
    add_connection_arguments,
    call_metadata,
    open_channel,
    tracking_stub,
)
from tracking_grpc.client.messages import trace_fixes
from tracking_grpc.client.schedule import Pace, batch_bounds
from tracking_grpc.client.session import DeviceSession, RetryPolicy, SessionStats
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.timestamps import TIME_FORMATS
from tracking_grpc.traces import FORMATS, SPEED_UNITS_MPS, CsvFormat, Trace, read_trace

log = logging.getLogger(__name__)

MAX_FAILURES_LISTED = 10


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How a trace is sent."""

    pace: Pace = field(default_factory=Pace)
    original_times: bool = False
    tick_ms: int = 20
    batch_fixes: int = 100
    window: int = 8
    want_events: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(slots=True)
class ReplayReport:
    """Per-device outcome of a replay and its totals."""

    fixes: int
    offset_ms: int
    devices: int = 0
    elapsed_s: float = 0.0
    sessions: list[SessionStats] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(getattr(stats, name) for stats in self.sessions)

    def rejected(self) -> collections.Counter[str]:
        counts: collections.Counter[str] = collections.Counter()
        for stats in self.sessions:
            counts.update(stats.rejected)
        return counts

    def failed(self) -> list[SessionStats]:
        return [s for s in self.sessions if s.error or s.settled < s.sent]

    def summary(self, title: str) -> str:
        rate = self.fixes / self.elapsed_s if self.elapsed_s > 0 else 0.0
        devices = self.devices or len(self.sessions)
        lines = [
            f"{title}: {devices} devices, {self.fixes} fixes "
            f"in {self.elapsed_s:.1f} s ({rate:.0f} fixes/s)",
            "  ".join(
                f"{label} {self.total(attr)}"
                for label, attr in (
                    ("sent", "sent"),
                    ("stored", "stored"),
                    ("duplicates", "duplicates"),
                    ("stored-before-ack", "stored_before_ack"),
                    ("resent", "resent"),
                    ("reconnects", "reconnects"),
                )
            )
            + f"  rejected {sum(self.rejected().values())}",
        ]
        for reason, count in sorted(self.rejected().items()):
            lines.append(f"  rejected {reason}: {count}")
        failed = self.failed()
        for stats in failed[:MAX_FAILURES_LISTED]:
            lines.append(f"  FAILED {stats.device}: {stats.error or 'fixes unsettled'}")
        if len(failed) > MAX_FAILURES_LISTED:
            lines.append(f"  ... and {len(failed) - MAX_FAILURES_LISTED} more devices")
        return "\n".join(lines)


def stamped_times(trace: Trace, options: ReplayOptions, start_ms: int) -> np.ndarray:
    """Fix times as sent: shifted to play as live, or as recorded."""
    if options.original_times or len(trace) == 0:
        return trace.time_ms
    offset = options.pace.offset_ms(
        start_ms, int(trace.time_ms[0]), trace.duration_ms()
    )
    return trace.time_ms + np.int64(offset)


def device_rows(trace: Trace) -> dict[str, np.ndarray]:
    """Row indices of each device, in trace (time) order."""
    names, codes = np.unique(trace.device.astype(str), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    splits = np.searchsorted(codes[order], np.arange(1, len(names)))
    return dict(zip(names.tolist(), np.split(order, splits), strict=True))


async def replay_trace(
    stub: track_pb2_grpc.TrackSessionStub,
    trace: Trace,
    options: ReplayOptions = ReplayOptions(),
    *,
    metadata: tuple[tuple[str, str], ...] = (),
    on_event=None,
    break_after_batches: dict[str, int] | None = None,
) -> ReplayReport:
    """Replay every device of ``trace`` through its own ``Track`` stream."""
    loop = asyncio.get_running_loop()
    start_clock = loop.time()
    start_ms = time.time_ns() // 1_000_000
    times = stamped_times(trace, options, start_ms)
    first_ms = int(trace.time_ms[0]) if len(trace) else 0
    due_ms = options.pace.due_ms(trace.time_ms, first_ms)
    report = ReplayReport(
        len(trace), int(times[0] - trace.time_ms[0]) if len(trace) else 0
    )

    sessions, pumps = [], []
    for device, rows in device_rows(trace).items():
        fixes = trace_fixes(trace.take(rows), times[rows])
        starts = batch_bounds(due_ms[rows], options.tick_ms, options.batch_fixes)
        stops = np.r_[starts[1:], len(rows)]
        plan = [
            (due_ms[rows][a], fixes[a:b]) for a, b in zip(starts, stops, strict=True)
        ]
        feed: asyncio.Queue = asyncio.Queue()
        session = DeviceSession(
            stub,
            device,
            feed,
            metadata=metadata,
            window=options.window,
            retry=options.retry,
            want_events=options.want_events,
            on_event=on_event,
            break_after_batches=(break_after_batches or {}).get(device),
        )
        sessions.append(session)
        pumps.append(asyncio.create_task(_pump(feed, plan, start_clock)))

    try:
        report.sessions = list(await asyncio.gather(*(s.run() for s in sessions)))
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    report.elapsed_s = loop.time() - start_clock
    return report


async def _pump(feed: asyncio.Queue, plan: list, start_clock: float) -> None:
    """Put each batch on the feed when it is due, then the end marker."""
    loop = asyncio.get_running_loop()
    for due_ms, fixes in plan:
        delay_s = start_clock + due_ms / 1000.0 - loop.time()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        feed.put_nowait(fixes)
    feed.put_nowait(None)


async def publish_trace(
    stub: track_pb2_grpc.TrackSessionStub,
    trace: Trace,
    options: ReplayOptions = ReplayOptions(),
    *,
    metadata: tuple[tuple[str, str], ...] = (),
) -> ReplayReport:
    """Replay ``trace`` as columnar ``PublishBatch`` calls (fixes of many devices)."""
    loop = asyncio.get_running_loop()
    start_clock = loop.time()
    times = stamped_times(trace, options, time.time_ns() // 1_000_000)
    due_ms = options.pace.due_ms(trace.time_ms, int(trace.time_ms[0]))
    stats = SessionStats(device=f"gateway ({len(trace.devices())} devices)")
    report = ReplayReport(
        len(trace),
        int(times[0] - trace.time_ms[0]),
        devices=len(trace.devices()),
        sessions=[stats],
    )

    async def publish(a: int, b: int) -> None:
        request = track_pb2.PublishBatchRequest(columns=_columns(trace, times, a, b))
        response = await _publish_with_retry(
            stub, request, metadata, options.retry, stats
        )
        if response is not None:
            stats.stored += response.stored
            stats.duplicates += response.duplicates
            for rejection in response.rejections:
                stats.rejected[track_pb2.RejectReason.Name(rejection.reason)] += 1

    # Up to ``window`` calls in flight; each answers once its fixes are durable.
    in_flight: set[asyncio.Task] = set()
    starts = batch_bounds(due_ms, options.tick_ms, options.batch_fixes)
    for a, b in zip(starts, np.r_[starts[1:], len(trace)], strict=True):
        delay_s = start_clock + due_ms[a] / 1000.0 - loop.time()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if len(in_flight) >= options.window:
            _, in_flight = await asyncio.wait(
                in_flight, return_when=asyncio.FIRST_COMPLETED
            )
        if stats.error:
            break
        stats.sent += int(b - a)
        in_flight.add(asyncio.create_task(publish(a, b)))
    if in_flight:
        await asyncio.wait(in_flight)
    report.elapsed_s = loop.time() - start_clock
    return report


def _columns(
    trace: Trace, times: np.ndarray, a: int, b: int
) -> track_pb2.ColumnarFixes:
    names, index = np.unique(trace.device[a:b].astype(str), return_inverse=True)
    return track_pb2.ColumnarFixes(
        device_ids=names.tolist(),
        device_index=index.astype(np.uint32),
        seq=trace.seq[a:b],
        time_ms=times[a:b],
        lat=trace.lat[a:b],
        lon=trace.lon[a:b],
        accuracy_m=trace.accuracy_m[a:b],
        altitude_m=trace.altitude_m[a:b],
        speed_mps=trace.speed_mps[a:b],
        heading_deg=trace.heading_deg[a:b],
    )


async def _publish_with_retry(stub, request, metadata, retry, stats):
    for attempt in range(retry.max_attempts + 1):
        try:
            return await stub.PublishBatch(request, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if (
                exc.code() != grpc.StatusCode.UNAVAILABLE
                or attempt == retry.max_attempts
            ):
                stats.error = f"{exc.code().name}: {exc.details()}"
                return None
            stats.reconnects += 1
            await asyncio.sleep(retry.delay_s(attempt))
    return None


# --- command line -----------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "replay",
        help="stream a recorded trace (GPX or CSV) through the service",
        description=__doc__,
    )
    parser.add_argument("file", type=Path, help="GPX or CSV trace")
    parser.add_argument("--format", choices=FORMATS, default="auto")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0, help="N times real time")
    pace.add_argument("--fast", action="store_true", help="as fast as acks allow")
    parser.add_argument(
        "--original-times",
        action="store_true",
        help="send the recorded fix times (the server needs --max-fix-age-s 0)",
    )
    parser.add_argument(
        "--max-gap-s",
        type=float,
        help="shorten pauses between fixes to this (trips spread over months)",
    )
    parser.add_argument("--via", choices=("track", "publish"), default="track")
    parser.add_argument("--device-id", help="device id of a single-device file")
    parser.add_argument("--devices", nargs="+", help="replay only these devices")
    parser.add_argument("--tick-ms", type=int, default=20, help="batching tick")
    parser.add_argument("--batch-fixes", type=int, default=100, help="most per batch")
    parser.add_argument("--window", type=int, default=8, help="unacked batches")
    parser.add_argument("--events", action="store_true", help="print pushed events")
    columns = parser.add_argument_group("CSV columns (--format csv)")
    for role in ("device", "time", "lat", "lon", "accuracy", "altitude", "speed"):
        columns.add_argument(f"--{role}-column")
    columns.add_argument("--heading-column")
    columns.add_argument("--delimiter", default=",")
    columns.add_argument(
        "--time-format", default="iso", help=f"{TIME_FORMATS} or %%-pattern"
    )
    columns.add_argument(
        "--time-zone", default="UTC", help="zone of times without offset"
    )
    columns.add_argument("--speed-unit", choices=tuple(SPEED_UNITS_MPS), default="mps")
    add_connection_arguments(parser)
    parser.set_defaults(command=run)
    return parser


def csv_format_from(args: argparse.Namespace) -> CsvFormat | None:
    if args.format != "csv":
        return None
    for role in ("time", "lat", "lon"):
        if not getattr(args, f"{role}_column"):
            raise InvalidArgument(f"--{role}-column", "required with --format csv")
    return CsvFormat(
        time=args.time_column,
        lat=args.lat_column,
        lon=args.lon_column,
        device=args.device_column,
        accuracy=args.accuracy_column,
        altitude=args.altitude_column,
        speed=args.speed_column,
        heading=args.heading_column,
        delimiter=args.delimiter,
        time_format=args.time_format,
        time_zone=args.time_zone,
        speed_unit=args.speed_unit,
    )


def load_trace(args: argparse.Namespace) -> Trace:
    trace = read_trace(args.file, args.format, csv_format_from(args), args.device_id)
    if args.devices:
        trace = trace.take(np.isin(trace.device.astype(str), args.devices))
    if args.max_gap_s is not None:
        trace = trace.with_gaps_capped(round(args.max_gap_s * 1000))
    if len(trace) == 0:
        raise InvalidArgument("file", f"{args.file} holds no fixes to replay")
    return trace


def _print_event(event: event_pb2.Event) -> None:
    kind = event_pb2.EventType.Name(event.type).removeprefix("EVENT_TYPE_")
    subject = event.fence_id or event.route_id
    print(f"event {kind} {event.device_id} {subject} seq {event.fix_seq}", flush=True)


async def run(args: argparse.Namespace) -> int:
    trace = load_trace(args)
    options = ReplayOptions(
        pace=Pace(speed=args.speed, fast=args.fast),
        original_times=args.original_times,
        tick_ms=args.tick_ms,
        batch_fixes=args.batch_fixes,
        window=args.window,
        want_events=args.events,
    )
    metadata = call_metadata(args.token)
    async with open_channel(args.target) as channel:
        stub = tracking_stub(channel)
        if args.via == "publish":
            report = await publish_trace(stub, trace, options, metadata=metadata)
        else:
            report = await replay_trace(
                stub,
                trace,
                options,
                metadata=metadata,
                on_event=_print_event if args.events else None,
            )
    print(report.summary(f"replayed {args.file.name}"))
    return 1 if report.failed() else 0
