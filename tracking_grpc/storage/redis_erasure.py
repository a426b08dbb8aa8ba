"""Erasure notices between server processes, on Redis pub/sub.

Stored data is shared, so the process that answers ``EraseDevice`` erases it for
everyone; in-process state (live activity, geofence memberships, monitored routes)
is each process's own. After erasing, that process announces the tenant and device
on one channel (``<prefix>erasures``) and every other process that shares the Redis
forgets the device's state when the notice arrives. On a Redis Cluster the channel
is sharded (SPUBLISH), as live fan-out is.

Pub/sub delivers at most once: a process whose subscription is broken while the
notice is sent keeps the device's state (until it restarts, or the device is erased
again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable

from tracking_grpc.storage import redis_pubsub
from tracking_grpc.storage.redis_client import Connection, unavailable

log = logging.getLogger(__name__)

CHANNEL = "erasures"  # after redis_key_prefix
SUBSCRIBE_WAIT_S = 10.0

Forget = Callable[[str, str], Awaitable[object]]


class RedisErasureNotices:
    """Announces this process's erasures; forgets the devices others erased."""

    def __init__(self, connection: Connection, prefix: str, forget: Forget) -> None:
        self.connection = connection
        self.channel = prefix + CHANNEL
        self.forget = forget
        self.process = uuid.uuid4().hex[:16]
        self.heard = 0  # notices of other processes acted on
        self._task: asyncio.Task[None] | None = None
        self._tried = asyncio.Event()

    async def start(self) -> None:
        """Listen; returns once subscribed, or after a failed try (then retried in
        the background)."""
        self._task = asyncio.create_task(self._listen(), name="erasure-notices")
        await asyncio.wait_for(self._tried.wait(), SUBSCRIBE_WAIT_S)

    async def announce(self, tenant: str, device: str) -> None:
        """Tell the other processes that ``device`` of ``tenant`` was erased."""
        notice = json.dumps(
            {"process": self.process, "tenant": tenant, "device": device}
        )
        with unavailable("erasure notices"):
            client = await self.connection.get()
            await redis_pubsub.publish(client, self.channel, notice)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.connection.close()

    async def _listen(self) -> None:
        await redis_pubsub.listen(
            self.connection, self.channel, self._heard, self._tried, "erasure notices"
        )

    async def _heard(self, data: bytes) -> None:
        try:
            notice = json.loads(data)
            process, tenant = notice["process"], str(notice["tenant"])
            device = str(notice["device"])
        except (ValueError, KeyError, TypeError):
            log.warning("dropped an undecodable erasure notice")
            return
        if process == self.process:
            return
        try:
            forgotten = await self.forget(tenant, device)
        except Exception:
            log.exception("forgetting an erased device of tenant %s failed", tenant)
            return
        self.heard += 1
        log.info(
            "forgot device %r of tenant %s, erased by another process: %s",
            device,
            tenant,
            forgotten,
        )
