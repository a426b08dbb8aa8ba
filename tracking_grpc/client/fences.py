"""``fences import FILE | list | events``: geofences and their events from a shell.

tracking fences import depots.geojson --replace
tracking fences list --label depot
tracking fences events --since-s 3600 --device van-1
tracking fences events --type OFFLINE --type OVERSPEED_STARTED
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tracking.v1 import event_pb2, geofence_pb2, geofence_pb2_grpc

from tracking_grpc.client.channel import (
    add_connection_arguments,
    call_metadata,
    exit_on_rpc_error,
    open_channel,
)
from tracking_grpc.client.flags import positive_float
from tracking_grpc.client.messages import iso_time
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.files import unreadable


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fences",
        help="import and list geofences, list their events",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["import", "list", "events"])
    parser.add_argument(
        "file", nargs="?", type=Path, help="GeoJSON FeatureCollection (import)"
    )
    parser.add_argument(
        "--replace", action="store_true", help="import: replace fences whose id exists"
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="import: repair what can be repaired instead of refusing",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        help="list: only fences with this label (repeatable)",
    )
    parser.add_argument("--fence", default="", help="events: of this fence only")
    parser.add_argument("--device", default="", help="events: of this device only")
    parser.add_argument(
        "--type",
        action="append",
        default=[],
        choices=[n.removeprefix("EVENT_TYPE_") for n in event_pb2.EventType.keys()][1:],
        metavar="TYPE",
        help="events: of this type only (repeatable; activity and route types too, "
        "e.g. OFFLINE, ARRIVED); default ENTER, EXIT, DWELL and CROSS",
    )
    parser.add_argument(
        "--since-s",
        type=positive_float,
        default=86_400.0,
        help="events: from this many seconds ago (default a day)",
    )
    add_connection_arguments(parser)
    parser.set_defaults(command=run)
    return parser


@exit_on_rpc_error
async def run(args: argparse.Namespace) -> int:
    if args.action == "import":
        check_import_file(args.file)
    metadata = call_metadata(args.token)
    async with open_channel(args.target) as channel:
        stub = geofence_pb2_grpc.GeofenceStub(channel)
        if args.action == "import":
            return await _import(stub, args, metadata)
        if args.action == "list":
            return await _list(stub, args, metadata)
        return await _events(stub, args, metadata)


def check_import_file(path: Path | None) -> None:
    """Refuse before connecting when there is no file to import."""
    if path is None:
        raise InvalidArgument("file", "name the GeoJSON file to import")
    fault = unreadable(path)
    if fault:
        raise InvalidArgument("file", f"GeoJSON file: {fault}: {path}")


async def _import(stub, args, metadata) -> int:
    request = geofence_pb2.ImportFencesRequest(
        geojson=args.file.read_text(),
        repair=args.repair,
        replace_existing=args.replace,
    )
    answer = await stub.ImportFences(request, metadata=metadata)
    print(
        f"imported {len(answer.fence_ids)} fences "
        f"(created {answer.created}, replaced {answer.replaced})"
    )
    for repair in answer.repairs:
        print(f"repaired {repair}")
    return 0


async def _list(stub, args, metadata) -> int:
    token = ""
    while True:
        page = await stub.ListFences(
            geofence_pb2.ListFencesRequest(
                labels=args.label, page_token=token, page_size=1000
            ),
            metadata=metadata,
        )
        for fence in page.fences:
            kind = fence.shape.WhichOneof("shape")
            print(
                f"{fence.fence_id}\t{kind}\tv{fence.version}\t"
                f"{','.join(fence.labels)}\t{fence.name}"
            )
        token = page.next_page_token
        if not token:
            return 0


async def _events(stub, args, metadata) -> int:
    now_ms = time.time_ns() // 1_000_000
    token = ""
    while True:
        page = await stub.ListEvents(
            geofence_pb2.ListEventsRequest(
                start_ms=max(0, now_ms - int(args.since_s * 1000)),
                device_id=args.device,
                fence_id=args.fence,
                types=[event_pb2.EventType.Value(f"EVENT_TYPE_{t}") for t in args.type],
                page_token=token,
                page_size=1000,
            ),
            metadata=metadata,
        )
        for e in page.events:
            kind = event_pb2.EventType.Name(e.type).removeprefix("EVENT_TYPE_")
            print(
                f"{iso_time(e.time_ms)}\t{e.device_id}\t{kind}\t{e.fence_id}\t"
                f"{e.position.lat:.6f},{e.position.lon:.6f}\tseq {e.fix_seq}"
            )
        token = page.next_page_token
        if not token:
            return 0
