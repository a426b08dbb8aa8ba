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
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from tracking_grpc.errors import Unavailable
from tracking_grpc.storage.redis_client import Connection, is_cluster, unavailable

log = logging.getLogger(__name__)

CHANNEL = "erasures"  # after redis_key_prefix
RETRY_S = (0.1, 0.5, 1.0, 2.0)
SUBSCRIBE_WAIT_S = 10.0
DATA_MESSAGES = ("message", "smessage")

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
            if is_cluster(client):
                await client.spublish(self.channel, notice)
            else:
                await client.publish(self.channel, notice)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.connection.close()

    async def _listen(self) -> None:
        """Receive notices forever, subscribing again after connection losses."""
        failures = 0
        while True:
            pubsub = None
            try:
                client = await self.connection.get()
                sharded = is_cluster(client)
                pubsub = client.pubsub()
                if sharded:
                    await pubsub.ssubscribe(self.channel)
                else:
                    await pubsub.subscribe(self.channel)
                self._tried.set()
                if failures:
                    log.warning("erasure notices subscribed again")
                failures = 0
                while True:
                    message = await _next(pubsub, sharded)
                    if message is not None and message["type"] in DATA_MESSAGES:
                        await self._heard(message["data"])
            except (RedisError, RedisClusterException, OSError, Unavailable) as exc:
                self._tried.set()
                delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "erasure notices lost (%s); retry in %.1fs", exc, delay)
                await asyncio.sleep(delay)
            finally:
                if pubsub is not None:
                    await _close_quietly(pubsub)

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


async def _next(pubsub: Any, sharded: bool) -> dict | None:
    if sharded:
        return await pubsub.get_sharded_message(
            ignore_subscribe_messages=True, timeout=1.0
        )
    return await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)


async def _close_quietly(pubsub: Any) -> None:
    try:
        await pubsub.aclose()
    except (RedisError, RedisClusterException, OSError):
        log.debug("closing a broken pub/sub connection failed", exc_info=True)
