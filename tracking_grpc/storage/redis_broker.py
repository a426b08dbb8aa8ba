"""Cross-process fan-out of live updates through Redis pub/sub.

Every server process publishes the live updates it made and subscribes to all of
them, so a watcher on any process sees devices streaming into any other. On a single
Redis this is one PUBLISH channel; on a Redis Cluster it is sharded pub/sub
(SPUBLISH/SSUBSCRIBE) over ``SHARDS`` channels, split by device bucket, so that the
traffic is spread over the nodes instead of broadcast to all of them.

Pub/sub delivers at most once: a subscriber disconnected for a while misses what was
published meanwhile (watchers get the current state again from the live store).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from typing import Any

import numpy as np
from redis.exceptions import RedisClusterException, RedisError

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import Unavailable
from tracking_grpc.storage import redis_keys as keys
from tracking_grpc.storage.base import UpdateHandler
from tracking_grpc.storage.redis_client import Connection, is_cluster, unavailable
from tracking_grpc.storage.redis_live import RECORD, RECORD_NAMES

log = logging.getLogger(__name__)

SHARDS = 16
HEADER = struct.Struct("<I")
RETRY_S = (0.1, 0.5, 1.0, 2.0)
DATA_MESSAGES = ("message", "smessage")


def encode(batch: FixBatch) -> bytes:
    """A batch as bytes: a JSON header (tenant, devices) and the packed fix records."""
    header = json.dumps({"tenant": batch.tenant, "devices": batch.device.tolist()})
    table = np.empty(len(batch), dtype=RECORD)
    for name in RECORD_NAMES:
        table[name] = getattr(batch, name)
    head = header.encode()
    return HEADER.pack(len(head)) + head + table.tobytes()


def decode(data: bytes) -> FixBatch:
    (size,) = HEADER.unpack_from(data)
    header = json.loads(data[HEADER.size : HEADER.size + size])
    table = np.frombuffer(data[HEADER.size + size :], dtype=RECORD)
    columns = {name: table[name].copy() for name in RECORD_NAMES}
    devices = np.array(header["devices"], dtype=object).reshape(-1)
    return FixBatch(tenant=header["tenant"], device=devices, **columns)


class RedisBroker:
    """Broker on Redis pub/sub (sharded on a cluster)."""

    def __init__(self, redis: Connection, prefix: str = "trk:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._handlers: list[UpdateHandler] = []
        self._task: asyncio.Task | None = None
        self._tried = asyncio.Event()

    @classmethod
    async def open(cls, url: str, prefix: str = "trk:") -> RedisBroker:
        """A broker on the Redis at ``url``; it connects when Redis is there."""
        return cls(Connection(url), prefix)

    def channels(self, sharded: bool) -> list[str]:
        if not sharded:
            return [f"{self.prefix}updates"]
        return [f"{self.prefix}updates:{{s{shard}}}" for shard in range(SHARDS)]

    async def publish(self, updates: FixBatch) -> None:
        if len(updates) == 0:
            return
        with unavailable("live fan-out"):
            client = await self.redis.get()
            if not is_cluster(client):
                await client.publish(self.channels(False)[0], encode(updates))
                return
            shard = keys.bucket_of(updates.device, SHARDS)
            channels = self.channels(True)
            async with client.pipeline(transaction=False) as pipe:
                for s in np.unique(shard).tolist():
                    pipe.spublish(channels[s], encode(updates.take(shard == s)))
                await pipe.execute()

    async def subscribe(self, handler: UpdateHandler) -> None:
        """Register ``handler``; returns once subscribed, or after a failed try
        (the subscription is then retried in the background)."""
        self._handlers.append(handler)
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="redis-broker")
        await asyncio.wait_for(self._tried.wait(), timeout=10.0)

    async def ping(self) -> None:
        with unavailable("Redis pub/sub"):
            await (await self.redis.get()).ping()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.redis.close()

    async def _listen(self) -> None:
        """Receive and dispatch forever, resubscribing after connection losses."""
        failures = 0
        while True:
            pubsub = None
            try:
                client = await self.redis.get()
                sharded = is_cluster(client)
                pubsub = client.pubsub()
                await self._join(pubsub, sharded)
                self._tried.set()
                if failures:
                    log.warning("live fan-out subscribed again")
                failures = 0
                while True:
                    message = await self._next(pubsub, sharded)
                    if message is not None and message["type"] in DATA_MESSAGES:
                        await self._dispatch(message["data"])
            except (RedisError, RedisClusterException, OSError, Unavailable) as exc:
                self._tried.set()
                delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "live fan-out lost (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
            finally:
                if pubsub is not None:
                    await _close_quietly(pubsub)

    async def _join(self, pubsub: Any, sharded: bool) -> None:
        if sharded:
            await pubsub.ssubscribe(*self.channels(True))
        else:
            await pubsub.subscribe(*self.channels(False))

    async def _next(self, pubsub: Any, sharded: bool) -> dict | None:
        if sharded:
            return await pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=1.0
            )
        return await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)

    async def _dispatch(self, data: bytes) -> None:
        try:
            batch = decode(data)
        except (ValueError, KeyError, struct.error):
            log.exception("dropped an undecodable live update")
            return
        for handler in list(self._handlers):
            try:
                await handler(batch)
            except Exception:
                log.exception("live update handler %r failed", handler)


async def _close_quietly(pubsub: Any) -> None:
    try:
        await pubsub.aclose()
    except (RedisError, RedisClusterException, OSError):
        log.debug("closing a broken pub/sub connection failed", exc_info=True)
