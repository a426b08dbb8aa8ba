"""``export DEVICE``: a device's stored track as GPX, GeoJSON or CSV.

    tracking export van-1 --format gpx --since-s 86400 --output van-1.gpx
    tracking export van-1 --format csv --from 2026-12-01T00:00Z --to 2026-12-02T00:00Z
    tracking export --format csv -- -2+3      # an id that starts with "-"

The document comes from ``History.ExportTrack`` in pieces and is written as they
arrive, to ``--output`` or to standard output. A file is written beside its final
name and renamed into place once the whole document has arrived, so a failed call
leaves no partial file behind. A device with no fixes in the range (or unknown)
gives a document with no points.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from tracking.v1 import history_pb2, history_pb2_grpc

from tracking_grpc.client.channel import (
    add_connection_arguments,
    call_metadata,
    exit_on_rpc_error,
    open_channel,
)
from tracking_grpc.client.flags import non_negative_float, positive_float

FORMATS = {
    "gpx": history_pb2.EXPORT_FORMAT_GPX,
    "geojson": history_pb2.EXPORT_FORMAT_GEOJSON,
    "csv": history_pb2.EXPORT_FORMAT_CSV,
}
DEFAULT_SINCE_S = 86_400.0
KINDS = {
    "raw": history_pb2.TRACK_KIND_RAW,
    "clean": history_pb2.TRACK_KIND_CLEAN,
    "smoothed": history_pb2.TRACK_KIND_SMOOTHED,
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="a device's stored track as GPX, GeoJSON or CSV",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("device_id", metavar="DEVICE")
    parser.add_argument("--format", choices=sorted(FORMATS), default="gpx")
    parser.add_argument(
        "--kind",
        choices=list(KINDS),
        default="raw",
        help="raw: every stored fix; clean: without outliers; smoothed: clean "
        "fixes at their smoothed positions (default raw)",
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--since-s",
        type=positive_float,
        help="the range is this many seconds up to its end (default a day)",
    )
    start.add_argument(
        "--from",
        dest="start",
        type=parse_time,
        help="start of the range, ISO 8601 (UTC when no offset is given)",
    )
    parser.add_argument(
        "--to",
        dest="end",
        type=parse_time,
        help="end of the range, ISO 8601 (default now)",
    )
    parser.add_argument(
        "--simplify-m",
        type=non_negative_float,
        default=0.0,
        help="drop fixes that move the line by less than this many metres",
    )
    parser.add_argument(
        "--output",
        "-o",
        type=output_path,
        help="file to write, in an existing directory (default standard output)",
    )
    add_connection_arguments(parser)
    parser.set_defaults(command=run)
    return parser


def parse_time(text: str) -> int:
    """An ISO 8601 time as epoch milliseconds (an argparse type)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-12-01T08:00Z, not {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def output_path(text: str) -> Path:
    """A file to write whose directory exists (an argparse type): refused before
    the call, not after the document has come."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; name a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no directory {str(path.parent)!r}")
    return path


def time_range(args: argparse.Namespace, now_ms: int) -> tuple[int, int]:
    """``(start_ms, end_ms)`` from ``--from``/``--to`` or ``--since-s``."""
    end_ms = now_ms if args.end is None else args.end
    if args.start is not None:
        return args.start, end_ms
    since_s = DEFAULT_SINCE_S if args.since_s is None else args.since_s
    return max(0, end_ms - round(since_s * 1000)), end_ms


def request_of(args: argparse.Namespace, now_ms: int) -> history_pb2.ExportTrackRequest:
    start_ms, end_ms = time_range(args, now_ms)
    return history_pb2.ExportTrackRequest(
        track=history_pb2.GetTrackRequest(
            device_id=args.device_id,
            start_ms=start_ms,
            end_ms=end_ms,
            kind=KINDS[args.kind],
            simplify_tolerance_m=args.simplify_m,
        ),
        format=FORMATS[args.format],
    )


@exit_on_rpc_error
async def run(args: argparse.Namespace) -> int:
    if args.start is not None and args.end is not None and args.end <= args.start:
        print("tracking: --to must come after --from", file=sys.stderr)
        return 2
    request = request_of(args, time.time_ns() // 1_000_000)
    async with open_channel(args.target) as channel:
        call = history_pb2_grpc.HistoryStub(channel).ExportTrack(
            request, metadata=call_metadata(args.token)
        )
        if args.output is None:
            await _write_all(call, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return 0
        target = args.output
        handle, part = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
        try:
            with os.fdopen(handle, "wb") as out:
                await _write_all(call, out)
                os.fchmod(out.fileno(), _file_mode())  # as open() would make it
            os.replace(part, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise
    return 0


def _file_mode() -> int:
    """0o666 less the umask: the mode of a file the user's shell would create."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


async def _write_all(call, out: BinaryIO) -> None:
    async for piece in call:
        out.write(piece.data)
