"""The command-line client: replay traces, watch live positions, simulate devices.

Each command module exposes ``add_parser(subparsers)`` and ``async run(args) -> int``
and talks to the service only through the generated ``tracking.v1`` stubs.
"""
