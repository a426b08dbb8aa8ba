"""Fence and event repositories on each backend, on private databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import require_service
from tracking_grpc.storage.postgres_fences import (
    PostgresEventRepository,
    PostgresFenceRepository,
    PostgresGeofenceDatabase,
    migration_statements,
)
from tracking_grpc.storage.sqlite_fences import (
    SqliteEventRepository,
    SqliteFenceRepository,
    SqliteGeofenceDatabase,
)

PG_ADMIN_URL = os.environ.get(
    "TRACKING_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin(statement: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)


@pytest.fixture(scope="session")
def geo_pg_url() -> Iterator[str]:
    """A private database with the geofence tables, dropped at the end."""
    try:
        _admin("SELECT 1")
    except psycopg.OperationalError as exc:
        require_service("PostgreSQL", f"{PG_ADMIN_URL}: {exc}")
    name = f"geo_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _admin(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in migration_statements():
                conn.execute(statement.encode())
        yield url
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def geo_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[object, object]]:
    """(FenceRepository, EventRepository) of one backend."""
    if request.param == "sqlite":
        sqlite = await SqliteGeofenceDatabase.open(tmp_path / "geofence.sqlite3")
        yield SqliteFenceRepository(sqlite), SqliteEventRepository(sqlite)
        await sqlite.close()
        return
    url = request.getfixturevalue("geo_pg_url")
    postgres = await PostgresGeofenceDatabase.open(url)
    yield PostgresFenceRepository(postgres), PostgresEventRepository(postgres)
    await postgres.close()


@pytest.fixture
def tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:8]}"
