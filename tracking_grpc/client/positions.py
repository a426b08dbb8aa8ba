"""``positions ID...``: the newest position of each named device."""

from __future__ import annotations

import argparse

from tracking.v1 import track_pb2

from tracking_grpc.client.channel import (
    add_connection_arguments,
    call_metadata,
    exit_on_rpc_error,
    open_channel,
    tracking_stub,
)
from tracking_grpc.client.messages import position_json, position_line


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "positions", help="newest position of each named device", description=__doc__
    )
    parser.add_argument("device_ids", nargs="+", metavar="ID")
    parser.add_argument("--json", action="store_true", help="JSON lines")
    add_connection_arguments(parser)
    parser.set_defaults(command=run)
    return parser


@exit_on_rpc_error
async def run(args: argparse.Namespace) -> int:
    request = track_pb2.GetLastPositionsRequest(device_ids=args.device_ids)
    async with open_channel(args.target) as channel:
        response = await tracking_stub(channel).GetLastPositions(
            request, metadata=call_metadata(args.token)
        )
    for position in response.positions:
        print(position_json(position) if args.json else position_line(position))
    if response.missing_device_ids:
        print("no position: " + " ".join(response.missing_device_ids))
    return 0
