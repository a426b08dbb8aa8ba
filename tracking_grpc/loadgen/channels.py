"""A pool of client channels, each carrying a bounded number of streams."""

from __future__ import annotations

import asyncio
import time

import grpc
from tracking.v1 import track_pb2_grpc

OPTIONS = [
    # Separate TCP connections per channel, not one shared subchannel.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


async def sleep_until(wall_s: float) -> None:
    """Sleep until the wall clock reaches ``wall_s``."""
    # A loop, not one sleep: the event loop's timers may fire up to 1 ms early.
    while (delay := wall_s - time.time()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(delay)


class ChannelPool:
    """Stubs by slot: slot ``i`` uses channel ``i // streams_per_channel``."""

    def __init__(self, target: str, streams_per_channel: int, token: str = "") -> None:
        self.target = target
        self.streams_per_channel = max(1, streams_per_channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._stubs: dict[int, track_pb2_grpc.TrackSessionStub] = {}

    def stub(self, slot: int) -> track_pb2_grpc.TrackSessionStub:
        number = slot // self.streams_per_channel
        stub = self._stubs.get(number)
        if stub is None:
            channel = grpc.aio.insecure_channel(self.target, options=OPTIONS)
            self._channels[number] = channel
            stub = self._stubs[number] = track_pb2_grpc.TrackSessionStub(channel)
        return stub

    async def close(self) -> None:
        """Close every channel (their calls fail with CANCELLED); stubs start anew."""
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(c.close(grace=None) for c in channels))
