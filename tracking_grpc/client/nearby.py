"""``nearby LAT LON RADIUS_M``: devices whose newest position is near a point."""

from __future__ import annotations

import argparse

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


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "nearby", help="devices near a point, nearest first", description=__doc__
    )
    parser.add_argument("lat", type=float)
    parser.add_argument("lon", type=float)
    parser.add_argument("radius_m", type=positive_float)
    parser.add_argument("--limit", type=positive_int, default=100)
    parser.add_argument("--json", action="store_true", help="JSON lines")
    add_connection_arguments(parser)
    parser.set_defaults(command=run)
    return parser


@exit_on_rpc_error
async def run(args: argparse.Namespace) -> int:
    request = track_pb2.NearbyRequest(
        center=common_pb2.LatLng(lat=args.lat, lon=args.lon),
        radius_m=args.radius_m,
        limit=args.limit,
    )
    async with open_channel(args.target) as channel:
        response = await tracking_stub(channel).Nearby(
            request, metadata=call_metadata(args.token)
        )
    for device in response.devices:
        distance_m = round(device.distance_m, 1)
        if args.json:
            print(position_json(device.position, distance_m=distance_m))
        else:
            print(position_line(device.position, f"{distance_m:8.1f} m"))
    if not response.devices and not args.json:  # JSON lines: none is no line
        print(f"no device within {args.radius_m:g} m of {args.lat:g}, {args.lon:g}")
    return 0
