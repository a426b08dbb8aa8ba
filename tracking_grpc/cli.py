"""Command line: ``tracking serve`` and the other subcommands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from tracking_grpc import config
from tracking_grpc.client.commands import COMMANDS as CLIENT_COMMANDS
from tracking_grpc.client.flags import positive_int

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int | None]]


def setup_logging(settings: config.Settings) -> None:
    """JSON lines or text on stderr, as ``log_format`` says (see observability.logs)."""
    from tracking_grpc.observability import logs

    logs.configure(settings, sys.stderr)


async def _serve(args: argparse.Namespace) -> int:
    from tracking_grpc.server import serve

    settings = config.load(args)
    setup_logging(settings)
    await serve(settings)
    return 0


def _serve_workers(args: argparse.Namespace) -> int | None:
    """With ``--workers`` above 1, fork the workers before any event loop exists."""
    from tracking_grpc import workers

    settings = config.load(args)
    workers.check_workers(settings)
    if settings.workers == 1:
        return None
    setup_logging(settings)
    return workers.supervise(settings)


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the gRPC server")
    config.add_arguments(parser)
    parser.set_defaults(command=_serve, before_loop=_serve_workers)


# The settings the one-off commands read: they get flags there and are the ones
# checked (every setting still comes from the TOML file and the environment, as for
# serve, so a job sharing the server's configuration runs without its key files).
LOG_SETTINGS = ("log_format", "log_level")
MIGRATE_SETTINGS = ("database_url", "database_timeout_s", *LOG_SETTINGS)
PURGE_SETTINGS = (
    "data_dir",
    "fanout_interest_ttl_s",
    "max_future_skew_s",
    "database_url",
    "database_pool_size",
    "database_timeout_s",
    "sqlite_synchronous",
    "redis_url",
    "redis_key_prefix",
    "event_stream_partitions",
    "retention_days",
    *LOG_SETTINGS,
)


async def _migrate(args: argparse.Namespace) -> int:
    from tracking_grpc.errors import FailedPrecondition
    from tracking_grpc.storage import schema

    settings = config.load(args, only=MIGRATE_SETTINGS)
    setup_logging(settings)
    if not settings.database_url:
        raise FailedPrecondition(
            "migrate needs a PostgreSQL database: set --database-url or "
            "TRACKING_DATABASE_URL (the embedded store needs no migrations)"
        )
    applied = await schema.migrate(settings.database_url)
    latest = schema.available()[-1].version
    if applied:
        print(f"applied migrations {applied}; the schema is at version {latest}")
    else:
        print(f"nothing to apply; the schema is at version {latest}")
    return 0


def add_migrate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "migrate", help="create or upgrade the PostgreSQL schema (run before serve)"
    )
    config.add_arguments(parser, MIGRATE_SETTINGS)
    parser.set_defaults(command=_migrate)


async def _purge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tracking_grpc.errors import FailedPrecondition
    from tracking_grpc.retention import cutoff_ms, purge
    from tracking_grpc.servicers.geofence import (
        events_purger,
        open_stores,
        stream_trimmer,
    )
    from tracking_grpc.storage import factory

    settings = config.load(args, only=PURGE_SETTINGS)
    setup_logging(settings)
    if not settings.retention_days:
        raise FailedPrecondition(
            "purge needs --retention-days (or TRACKING_RETENTION_DAYS) above 0"
        )
    store = Path(settings.data_dir) / "history.sqlite3"
    if not settings.database_url and not store.is_file():
        # Opening it would make an empty store, and "deleted 0 fixes" would read
        # like a purge of the server's history.
        raise FailedPrecondition(
            f"no embedded store at {store}: pass the server's --data-dir, or "
            "--database-url for PostgreSQL"
        )
    closers: list[Callable[[], Awaitable[None]]] = []
    history = await factory.open_history(settings)
    live = trimmer = None
    try:
        if settings.redis_url:  # embedded live state lives in the server process
            live, broker = await factory.open_live(settings)
            closers += [broker.close, live.close]
            trimmer = stream_trimmer(settings)
            closers.append(trimmer.close)
        _, events = open_stores(settings, closers)
        cutoff = cutoff_ms(time.time_ns() // 1_000_000, settings.retention_days)
        report = await purge(history, live, [events_purger(events, trimmer)], cutoff)
    finally:
        for close in reversed(closers):
            await close()
        await history.close()
    print(f"deleted what is older than day {cutoff // 86_400_000}: {report.describe()}")
    return 0


def add_purge(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "purge",
        help="delete history older than --retention-days once (a server with "
        "retention_days set does it hourly)",
    )
    config.add_arguments(parser, PURGE_SETTINGS)
    parser.set_defaults(command=_purge)


async def _prepare_routing(args: argparse.Namespace) -> int:
    from tracking_grpc.routing import datasets

    settings = config.load(args)
    setup_logging(settings)
    data_dir = settings.routing_data_dir
    if not data_dir:
        print("tracking: set --routing-data-dir (where to write)", file=sys.stderr)
        return 2
    blocker = _not_a_directory(Path(data_dir))
    if blocker is not None:
        print(
            f"tracking: --routing-data-dir {data_dir}: {blocker} is not a directory",
            file=sys.stderr,
        )
        return 2
    prepared = datasets.prepare(
        Path(args.pbf),
        Path(data_dir),
        datasets.parse_profiles(args.profiles),
        small_component_size=args.small_component_size,
    )
    for dataset in prepared:
        print(f"{dataset.profile}: {dataset.base_path}")
    return 0


def _not_a_directory(path: Path) -> Path | None:
    """The nearest existing path at or above ``path`` when it is not a directory
    (a regular file where the datasets or one of their parents would go)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def add_prepare_routing(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-routing",
        help="build routing datasets (OSRM MLD) from an OpenStreetMap .osm.pbf",
    )
    parser.add_argument("--pbf", required=True, help="OpenStreetMap extract (.osm.pbf)")
    parser.add_argument(
        "--profiles", default="car,bicycle,foot", help="comma-separated profiles"
    )
    parser.add_argument(
        "--small-component-size",
        type=positive_int,
        default=1000,
        help="nodes below which a road network piece is not snapped to when a "
        "bigger one is near (lower it to ~50 for small city-centre extracts)",
    )
    config.add_arguments(parser)
    parser.set_defaults(command=_prepare_routing)


async def _trips(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tracking_grpc.activity.params import ActivityConfig
    from tracking_grpc.activity.report import describe
    from tracking_grpc.errors import InvalidArgument
    from tracking_grpc.files import unreadable
    from tracking_grpc.traces import read_trace

    fault = await asyncio.to_thread(unreadable, Path(args.trace))
    if fault:
        raise InvalidArgument("trace", f"{fault}: {args.trace}")
    activity = ActivityConfig.from_file(args.activity_config)
    trace = read_trace(args.trace)
    for line in describe(trace.to_batch(args.tenant), activity.params(args.tenant)):
        print(line)
    return 0


def add_trips(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "trips", help="print the trips and stops of a recorded trace (GPX or CSV)"
    )
    parser.add_argument("trace", help="trace file (formats: see tracking_grpc.traces)")
    parser.add_argument(
        "--activity-config", default="", help="TOML file of activity rules"
    )
    parser.add_argument("--tenant", default="default", help="whose rules apply")
    parser.set_defaults(command=_trips)


# Each entry adds one subcommand; its parser sets `command` to an async function.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_serve,
    add_migrate,
    add_purge,
    add_prepare_routing,
    add_trips,
    # replay, watch, simulate, positions, nearby (tracking_grpc/client/)
    *(command.add_parser for command in CLIENT_COMMANDS),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracking", description="Live location tracking over gRPC."
    )
    subparsers = parser.add_subparsers(dest="subcommand", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    for name, subparser in subparsers.choices.items():
        subparser.set_defaults(subcommand_parser=subparser, subcommand=name)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's arguments; an unknown one is reported with the usage of
    its subcommand (``tracking migrate --help``), not the whole tool's."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.subcommand_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        before_loop = getattr(args, "before_loop", None)
        handled = before_loop(args) if before_loop is not None else None
        if handled is not None:
            return handled
        return uvloop.run(args.command(args)) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`tracking watch | head`): stop as a shell tool would,
        # with nothing more written to the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # a readable line for the operator, not a traceback
        from tracking_grpc.errors import TrackingError

        if isinstance(exc, TrackingError):
            print(f"tracking: {exc.message}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
