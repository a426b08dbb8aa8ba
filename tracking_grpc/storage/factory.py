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

        return await PostgresHistoryStore.open(settings)
    path = Path(settings.data_dir) / "history.sqlite3"
    log.info("history: embedded SQLite at %s", path)
    return await SqliteHistoryStore.open(path, settings.sqlite_synchronous)


async def open_live(settings: Settings) -> tuple[LiveStore, Broker]:
    if settings.redis_url:
        from tracking_grpc.storage.redis_live import open_redis_live

        return await open_redis_live(settings)
    return MemoryLiveStore(), LocalBroker()
