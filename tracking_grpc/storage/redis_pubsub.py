"""One Redis pub/sub channel, listened to for the life of a process.

Live fan-out and erasure notices both subscribe to a channel of their own and must
keep listening through Redis restarts, failovers and broken connections. On a
Redis Cluster the channel is sharded (SSUBSCRIBE / SPUBLISH), so that a message
goes to the nodes of one slot and not to the whole cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from tracking_grpc.errors import Unavailable
from tracking_grpc.storage.redis_client import Connection, is_cluster

log = logging.getLogger(__name__)

RETRY_S = (0.1, 0.5, 1.0, 2.0)  # waits before subscribing again, then the last
DATA_MESSAGES = ("message", "smessage")


async def listen(
    connection: Connection,
    channel: str,
    handle: Callable[[bytes], Awaitable[None]],
    tried: asyncio.Event,
    what: str,
    on_resubscribed: Callable[[], None] | None = None,
) -> None:
    """Hand every message of ``channel`` to ``handle``, forever, subscribing again
    after a connection loss. ``tried`` is set after the first subscription (or
    failed try); ``on_resubscribed`` runs after each subscription that follows a
    loss. ``what`` names the listener in the logs."""
    failures = 0
    while True:
        pubsub = None
        try:
            client = await connection.get()
            sharded = is_cluster(client)
            pubsub = client.pubsub()
            if sharded:
                await pubsub.ssubscribe(channel)
            else:
                await pubsub.subscribe(channel)
            tried.set()
            if failures:
                log.warning("%s subscribed again", what)
                if on_resubscribed is not None:
                    on_resubscribed()
            failures = 0
            while True:
                message = await _next(pubsub, sharded)
                if message is not None and message["type"] in DATA_MESSAGES:
                    await handle(message["data"])
        except (RedisError, RedisClusterException, OSError, Unavailable) as exc:
            tried.set()
            delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
            failures += 1
            level = logging.WARNING if failures == 1 else logging.DEBUG
            log.log(level, "%s lost (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
        finally:
            if pubsub is not None:
                await _close_quietly(pubsub)


async def publish(client: Any, channel: str, message: bytes | str) -> None:
    """Publish on ``channel``, sharded on a cluster."""
    if is_cluster(client):
        await client.spublish(channel, message)
    else:
        await client.publish(channel, message)


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
