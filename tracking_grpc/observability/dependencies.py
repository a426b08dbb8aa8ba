"""Health of PostgreSQL and Redis, checked on a timer and exported as metrics.

Each check uses its own small connection (never the store's pool) so that a
saturated pool is not mistaken for a dead database. The result is the gauge
``tracking_dependency_up{dependency=...}``; a failing check logs one warning when
the dependency goes down and one info line when it comes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import psycopg
import redis.asyncio as aioredis

from tracking_grpc.config import Settings
from tracking_grpc.observability import metrics

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0


class PostgresCheck:
    """``SELECT 1`` over one connection, reopened after a failure."""

    name = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: psycopg.AsyncConnection | None = None

    async def __call__(self) -> None:
        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=int(CHECK_TIMEOUT_S)
            )
        try:
            await self._connection.execute("SELECT 1")
        except psycopg.Error:
            await self.close()
            raise

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        self._connection = None


class RedisCheck:
    """``PING``."""

    name = "redis"

    def __init__(self, url: str) -> None:
        self._client = aioredis.from_url(url, socket_timeout=CHECK_TIMEOUT_S)

    async def __call__(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()


Check = Callable[[], Awaitable[None]]


class DependencyMonitor:
    """Runs every configured check now and then; :meth:`check` runs them once."""

    def __init__(self, settings: Settings) -> None:
        self.interval_s = settings.health_check_interval_s
        self.checks: list[PostgresCheck | RedisCheck] = []
        if settings.database_url:
            self.checks.append(PostgresCheck(settings.database_url))
        if settings.redis_url:
            self.checks.append(RedisCheck(settings.redis_url))
        self._up: dict[str, bool] = {}
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> dict[str, bool]:
        results = await asyncio.gather(*(self._check_one(c) for c in self.checks))
        return dict(zip((c.name for c in self.checks), results, strict=True))

    async def _check_one(self, check: PostgresCheck | RedisCheck) -> bool:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await check()
            up = True
        except (OSError, TimeoutError, psycopg.Error, aioredis.RedisError) as exc:
            up = False
            if self._up.get(check.name, True):
                log.warning(
                    "%s health check failed: %s", check.name, type(exc).__name__
                )
        if up and self._up.get(check.name) is False:
            log.info("%s is healthy again", check.name)
        self._up[check.name] = up
        metrics.dependency_checked(check.name, up, time.perf_counter() - start)
        return up

    def start(self) -> None:
        if self.checks and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for check in self.checks:
            await check.close()
