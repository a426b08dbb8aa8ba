"""Connection flags shared by every client command: target address and bearer token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from tracking.v1 import track_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--target`` and ``--token`` (default: $TRACKING_TOKEN)."""
    parser.add_argument(
        "--target",
        type=parse_target,
        default=DEFAULT_TARGET,
        help=f"host:port of the tracking service (default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TRACKING_TOKEN", ""),
        help="JWT sent as 'authorization: Bearer' (default: $TRACKING_TOKEN)",
    )


def call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Metadata for every call: the bearer token when one is given."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def open_channel(target: str) -> grpc.aio.Channel:
    """An insecure channel (the service listens on loopback unless told otherwise)."""
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            # gRPC's own reconnect wait grows to 2 minutes; calls fail at once
            # meanwhile, so a client back from a long outage could spend its whole
            # give-up time waiting on it. The clients' jittered backoff (at most
            # 5 s) spreads reconnects instead.
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ],
    )


UNREACHABLE_AFTER_S = 1.0  # a command that retries says so once this long passed


@contextlib.asynccontextmanager
async def saying_when_unreachable(
    channel: grpc.aio.Channel, target: str, give_up_s: float
) -> AsyncIterator[None]:
    """Within the block, a command that reconnects on its own (``replay``) says
    once, on stderr, that nothing answers at ``target`` when the channel is not
    connected within ``UNREACHABLE_AFTER_S``, instead of waiting silently for up
    to ``give_up_s``."""

    async def watch() -> None:
        try:
            await asyncio.wait_for(channel.channel_ready(), UNREACHABLE_AFTER_S)
        except TimeoutError:
            print(
                f"tracking: nothing answers at {target} yet; retrying for up to "
                f"{give_up_s:g} s (--give-up-s)",
                file=sys.stderr,
                flush=True,
            )

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def tracking_stub(channel: grpc.aio.Channel) -> track_pb2_grpc.TrackSessionStub:
    return track_pb2_grpc.TrackSessionStub(channel)


def parse_target(text: str) -> str:
    """``HOST:PORT`` with a numeric port (an argparse type)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def exit_on_rpc_error(
    run: Callable[[argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], Awaitable[int]]:
    """A failed call prints one line (status and details) and exits with 1."""

    @functools.wraps(run)
    async def wrapper(args: argparse.Namespace) -> int:
        try:
            return await run(args)
        except grpc.aio.AioRpcError as exc:
            print(f"tracking: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1

    return wrapper
