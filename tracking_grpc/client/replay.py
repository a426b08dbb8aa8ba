"""``replay FILE``: stream a recorded trace through the service as live devices.

Every device of the trace gets its own ``Track`` stream (all concurrently); fixes
due within the same tick go out as one batch. With ``--via publish`` the trace is
sent instead as columnar ``PublishBatch`` calls, as a gateway would.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path

import numpy as np
from tracking.v1 import event_pb2, track_pb2_grpc

from tracking_grpc.client.channel import (
    add_connection_arguments,
    call_metadata,
    open_channel,
    saying_when_unreachable,
    tracking_stub,
)
from tracking_grpc.client.flags import non_negative_float, positive_float, positive_int
from tracking_grpc.client.gateway import publish_trace
from tracking_grpc.client.messages import iso_time, trace_fixes
from tracking_grpc.client.report import ReplayReport
from tracking_grpc.client.schedule import (
    DEFAULT_OPTIONS,
    Pace,
    ReplayOptions,
    batch_bounds,
    stamped_times,
)
from tracking_grpc.client.session import GIVE_UP_S, DeviceSession, RetryPolicy
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.files import unreadable
from tracking_grpc.timestamps import TIME_FORMATS
from tracking_grpc.traces import FORMATS, SPEED_UNITS_MPS, CsvFormat, Trace, read_trace

log = logging.getLogger(__name__)

__all__ = ["ReplayOptions", "ReplayReport", "publish_trace", "replay_trace"]


def device_rows(trace: Trace) -> dict[str, np.ndarray]:
    """Row indices of each device, in trace (time) order."""
    names, codes = np.unique(trace.device.astype(str), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    splits = np.searchsorted(codes[order], np.arange(1, len(names)))
    return dict(zip(names.tolist(), np.split(order, splits), strict=True))


async def replay_trace(
    stub: track_pb2_grpc.TrackSessionStub,
    trace: Trace,
    options: ReplayOptions = DEFAULT_OPTIONS,
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
    pace.add_argument(
        "--speed", type=positive_float, default=1.0, help="N times real time"
    )
    pace.add_argument("--fast", action="store_true", help="as fast as acks allow")
    parser.add_argument(
        "--original-times",
        action="store_true",
        help="send the recorded fix times (the server needs --max-fix-age-s 0)",
    )
    parser.add_argument(
        "--max-gap-s",
        type=non_negative_float,
        help="shorten pauses between fixes to this (trips spread over months)",
    )
    parser.add_argument("--via", choices=("track", "publish"), default="track")
    parser.add_argument(
        "--device-id",
        help="device id of a one-device file (replaces an id column's value)",
    )
    parser.add_argument("--devices", nargs="+", help="replay only these devices")
    parser.add_argument(
        "--tick-ms", type=positive_int, default=20, help="batching tick"
    )
    parser.add_argument(
        "--batch-fixes", type=positive_int, default=100, help="most per batch"
    )
    parser.add_argument(
        "--window", type=positive_int, default=8, help="unacked batches"
    )
    parser.add_argument(
        "--give-up-s",
        type=non_negative_float,
        default=GIVE_UP_S,
        help="fail a device after this long without a session (default %(default)s);"
        " until then it reconnects, waiting 0.1 s doubling to 5 s with full jitter",
    )
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
    fault = unreadable(args.file)
    if fault:
        raise InvalidArgument("file", f"trace file: {fault}: {args.file}")
    trace = read_trace(args.file, args.format, csv_format_from(args), args.device_id)
    if args.devices:
        trace = trace.take(np.isin(trace.device.astype(str), args.devices))
    if args.max_gap_s is not None:
        trace = trace.with_gaps_capped(round(args.max_gap_s * 1000))
    if len(trace) == 0:
        raise InvalidArgument("file", f"{args.file} holds no fixes to replay")
    return trace


def event_line(event: event_pb2.Event) -> str:
    """One line per event: when, what, which device and fence or route, and the
    details the event carries (attributes, then the activity's values)."""
    kind = event_pb2.EventType.Name(event.type).removeprefix("EVENT_TYPE_")
    words = [
        "event",
        iso_time(event.time_ms),
        kind,
        event.device_id,
    ]
    if event.fence_id:
        words.append(f"fence={event.fence_id}")
    if event.route_id:
        words.append(f"route={event.route_id}")
    words.append(f"seq={event.fix_seq}")
    words += [f"{k}={v}" for k, v in sorted(event.attributes.items())]
    if event.HasField("activity"):
        for field, value in event.activity.ListFields():
            if field.enum_type is not None:
                value = field.enum_type.values_by_number[value].name
                value = value.removeprefix("MOTION_").lower()
            elif isinstance(value, float):
                value = f"{value:.1f}"
            words.append(f"{field.name}={value}")
    return " ".join(words)


def _print_event(event: event_pb2.Event) -> None:
    print(event_line(event), flush=True)


async def run(args: argparse.Namespace) -> int:
    trace = load_trace(args)
    options = ReplayOptions(
        pace=Pace(speed=args.speed, fast=args.fast),
        original_times=args.original_times,
        tick_ms=args.tick_ms,
        batch_fixes=args.batch_fixes,
        window=args.window,
        want_events=args.events,
        retry=RetryPolicy(give_up_s=args.give_up_s),
    )
    metadata = call_metadata(args.token)
    async with (
        open_channel(args.target) as channel,
        saying_when_unreachable(channel, args.target, args.give_up_s),
    ):
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
    return report.exit_code()
