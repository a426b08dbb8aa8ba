"""The client's subcommands, for ``tracking_grpc.cli`` to register.

Each module's ``add_parser(subparsers)`` sets ``command`` (an ``async`` function taking
the parsed arguments and returning an exit code) as the parser's default.
"""

from __future__ import annotations

from tracking_grpc.client import (
    export,
    fences,
    nearby,
    positions,
    replay,
    simulate,
    watch,
)

COMMANDS = (replay, watch, simulate, positions, nearby, fences, export)


def add_client_parsers(subparsers) -> None:
    """Register every client subcommand."""
    for command in COMMANDS:
        command.add_parser(subparsers)
