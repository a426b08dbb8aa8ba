"""``watch``: print live position updates, a snapshot first, one line per position."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from tracking.v1 import common_pb2, track_pb2

from tracking_grpc.client.channel import (
    add_connection_arguments,
    call_metadata,
    exit_on_rpc_error,
    open_channel,
    tracking_stub,
)
from tracking_grpc.client.messages import position_json, position_line


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


async def print_updates(call, as_json: bool, count: int | None, out=None) -> int:
    """Print positions from a Watch stream; stop after ``count`` positions."""
    out = out or sys.stdout
    printed = 0
    async for response in call:
        for position in response.positions:
            if as_json:
                line = position_json(position, snapshot=response.snapshot)
            else:
                line = position_line(position, "snapshot" if response.snapshot else "")
            print(line, file=out, flush=True)
            printed += 1
            if count is not None and printed >= count:
                return printed
        if response.snapshot_done and not as_json:
            print("-- snapshot done, live updates follow", file=out, flush=True)
    return printed


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
    parser.add_argument("--count", type=int, help="stop after this many positions")
    parser.add_argument("--timeout", type=float, help="stop after this many seconds")
    add_connection_arguments(parser)
    parser.set_defaults(command=run)
    return parser


@exit_on_rpc_error
async def run(args: argparse.Namespace) -> int:
    async with open_channel(args.target) as channel:
        call = tracking_stub(channel).Watch(
            watch_request(args), metadata=call_metadata(args.token)
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.timeout):
                await print_updates(call, args.json, args.count)
        call.cancel()
    return 0
