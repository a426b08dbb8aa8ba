"""``watch``: print live position updates, a snapshot first, one line per position.

When the stream breaks (the server restarts) the watch reconnects with backoff; the
new snapshot brings every watched device up to date.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import grpc
from tracking.v1 import common_pb2, track_pb2

from tracking_grpc.client.channel import (
    add_connection_arguments,
    call_metadata,
    exit_on_rpc_error,
    open_channel,
    tracking_stub,
)
from tracking_grpc.client.flags import positive_float, positive_int
from tracking_grpc.client.messages import position_json, position_line
from tracking_grpc.client.session import RETRYABLE, Backoff, RetryPolicy


def parse_box(text: str) -> common_pb2.Area:
    """``S,W,N,E`` in degrees; west > east crosses the antimeridian."""
    south, west, north, east = _floats(text, 4, "--box S,W,N,E")
    box = common_pb2.BoundingBox(south=south, west=west, north=north, east=east)
    return common_pb2.Area(box=box)


def parse_circle(text: str) -> common_pb2.Area:
    """``LAT,LON,RADIUS_M``."""
    lat, lon, radius_m = _floats(text, 3, "--circle LAT,LON,RADIUS_M")
    centre = common_pb2.LatLng(lat=lat, lon=lon)
    return common_pb2.Area(circle=common_pb2.Circle(center=centre, radius_m=radius_m))


def _floats(text: str, count: int, usage: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"expected {usage}, got {text!r}")
    return values


def watch_request(args: argparse.Namespace) -> track_pb2.WatchRequest:
    request = track_pb2.WatchRequest(
        device_ids=args.device or [], skip_snapshot=args.skip_snapshot
    )
    area = args.box or args.circle
    if area is not None:
        request.area.CopyFrom(area)
    return request


class UpdatePrinter:
    """Prints positions from Watch streams, counting them across reconnects."""

    def __init__(self, as_json: bool, count: int | None, out=None) -> None:
        self.as_json = as_json
        self.count = count
        self.printed = 0
        self.responses = 0
        self.out = out or sys.stdout

    @property
    def done(self) -> bool:
        return self.count is not None and self.printed >= self.count

    async def follow(self, call) -> None:
        """Print until the stream ends or ``count`` positions have been printed."""
        async for response in call:
            self.responses += 1
            for position in response.positions:
                note = "snapshot" if response.snapshot else ""
                if self.as_json:
                    line = position_json(position, snapshot=response.snapshot)
                else:
                    line = position_line(position, note)
                print(line, file=self.out, flush=True)
                self.printed += 1
                if self.done:
                    return
            if response.snapshot_done and not self.as_json:
                print(
                    "-- snapshot done, live updates follow", file=self.out, flush=True
                )


async def watch(stub, request, metadata, printer: UpdatePrinter, retry: RetryPolicy):
    """Follow a Watch until ``count`` positions; reconnect when the stream ends.

    The server ends watches when it shuts down; a new snapshot catches up after
    the reconnect. Statuses that a retry cannot fix (bad filter, no credentials)
    are raised.
    """
    backoff = Backoff(retry)
    while not printer.done:
        received = printer.responses
        call = stub.Watch(request, metadata=metadata)
        try:
            await printer.follow(call)
            reason = "ended"
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE:
                raise
            reason = exc.code().name
        finally:
            call.cancel()
        if printer.done:
            return
        if printer.responses > received:
            backoff.succeeded()
        delay_s = backoff.next_delay_s()
        if delay_s is None:
            raise SystemExit(f"tracking: watch {backoff.gave_up(reason)}")
        print(f"-- watch {reason}, reconnecting", file=sys.stderr, flush=True)
        await asyncio.sleep(delay_s)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "watch", help="print live position updates", description=__doc__
    )
    parser.add_argument("--device", action="append", help="device id (repeatable)")
    area = parser.add_mutually_exclusive_group()
    area.add_argument("--box", type=parse_box, help="S,W,N,E in degrees")
    area.add_argument("--circle", type=parse_circle, help="LAT,LON,RADIUS_M")
    parser.add_argument("--skip-snapshot", action="store_true")
    parser.add_argument("--json", action="store_true", help="JSON lines")
    parser.add_argument(
        "--count", type=positive_int, help="stop after this many positions"
    )
    parser.add_argument(
        "--timeout", type=positive_float, help="stop after this many seconds"
    )
    add_connection_arguments(parser)
    parser.set_defaults(command=run)
    return parser


@exit_on_rpc_error
async def run(args: argparse.Namespace) -> int:
    printer = UpdatePrinter(args.json, args.count)
    async with open_channel(args.target) as channel:
        stub = tracking_stub(channel)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.timeout):
                await watch(
                    stub,
                    watch_request(args),
                    call_metadata(args.token),
                    printer,
                    RetryPolicy(),
                )
    return 0
