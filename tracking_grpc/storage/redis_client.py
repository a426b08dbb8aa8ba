"""Connecting to Redis, standalone or cluster, and mapping its errors.

One URL serves both: a server that reports ``cluster_enabled:1`` gets a cluster
client (slots discovered from it), anything else a plain client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypedDict, TypeGuard

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from tracking_grpc.errors import Unavailable

log = logging.getLogger(__name__)

Client = aioredis.Redis | RedisCluster


class _Timeouts(TypedDict):
    socket_timeout: float
    socket_connect_timeout: float


TIMEOUTS: _Timeouts = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}


async def connect(url: str, name: str | None = None) -> Client:
    """A client for the Redis at ``url``; a cluster client if it is a cluster node.
    ``name`` (CLIENT SETNAME) marks its connections in CLIENT LIST."""
    probe = aioredis.Redis.from_url(url, **TIMEOUTS)
    try:
        with unavailable("Redis"):
            info = await probe.info("cluster")
    finally:
        await probe.aclose()
    if info.get("cluster_enabled"):
        log.info("Redis at %s is a cluster node: using the cluster client", url)
        with unavailable("Redis Cluster"):
            cluster = RedisCluster.from_url(url, client_name=name, **TIMEOUTS)
            await cluster.initialize()
        return cluster
    return aioredis.Redis.from_url(url, client_name=name, **TIMEOUTS)


def is_cluster(client: Client) -> TypeGuard[RedisCluster]:
    return isinstance(client, RedisCluster)


@contextmanager
def unavailable(what: str) -> Iterator[None]:
    """Turn Redis being unreachable into ``Unavailable`` naming what failed.

    So are refusals that come from Redis's state, not from the command: a cluster
    down or asking to try again, a replica that does not take writes (READONLY:
    say, a failover in progress) and a server out of memory (OOM). Any other
    command Redis refused is a bug, not an outage, and propagates unchanged.
    """
    try:
        yield
    except (ClusterDownError, TryAgainError, ReadOnlyError, OutOfMemoryError) as exc:
        raise Unavailable(f"{what} unavailable: {exc}") from exc
    except ResponseError:
        raise
    except (RedisError, RedisClusterException, OSError) as exc:
        raise Unavailable(f"{what} unavailable: {exc}") from exc


class Connection:
    """A client made on first need, so that a process can start while Redis is down.

    ``get`` connects (deciding standalone or cluster) or raises ``Unavailable``; once
    made, the client reconnects by itself after outages.
    """

    def __init__(self, url: str, name: str | None = None) -> None:
        self.url = url
        self.name = name
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Client:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await connect(self.url, self.name)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
