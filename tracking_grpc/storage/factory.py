"""Chooses the backends from the settings: embedded unless URLs are configured."""

from __future__ import annotations

import logging
from pathlib import Path

from tracking_grpc.config import Settings
from tracking_grpc.storage.base import Broker, HistoryStore, LiveStore
from tracking_grpc.storage.memory import LocalBroker, MemoryLiveStore
from tracking_grpc.storage.sqlite import SqliteHistoryStore

log = logging.getLogger(__name__)


async def open_history(settings: Settings) -> HistoryStore:
    if settings.database_url:
        from tracking_grpc.storage.postgres import PostgresHistoryStore

        log.info("history: PostgreSQL")
        return await PostgresHistoryStore.open(
            settings.database_url,
            max_connections=settings.database_pool_size,
            pool_timeout_s=settings.database_timeout_s,
        )
    path = Path(settings.data_dir) / "history.sqlite3"
    log.info("history: embedded SQLite at %s", path)
    return await SqliteHistoryStore.open(path, settings.sqlite_synchronous)


async def open_live(settings: Settings) -> tuple[LiveStore, Broker]:
    if settings.redis_url:
        from tracking_grpc.storage.redis_broker import RedisBroker
        from tracking_grpc.storage.redis_live import RedisLiveStore

        log.info("live state and fan-out: Redis")
        prefix = settings.redis_key_prefix
        live = await RedisLiveStore.open(settings.redis_url, prefix)
        try:
            broker = await RedisBroker.open(
                settings.redis_url, prefix, settings.fanout_interest_ttl_s
            )
        except BaseException:
            await live.close()
            raise
        return live, broker
    return MemoryLiveStore(), LocalBroker()
