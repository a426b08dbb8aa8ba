"""PostgreSQL/PostGIS and Redis for tests: a private database and key prefix each.

The session gets one freshly created, migrated database (dropped at the end) cloned
from a template; tests that need an empty database clone a blank one. Redis tests get
a unique key prefix, and their keys are deleted afterwards. Missing services go
through ``require_service``, so CI fails instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import psycopg
import pytest
import redis
import redis.asyncio as aioredis

from tests.conftest import require_service
from tracking_grpc.config import Settings
from tracking_grpc.storage import schema
from tracking_grpc.storage.postgres import PostgresHistoryStore
from tracking_grpc.storage.sqlite import SqliteHistoryStore

PG_ADMIN_URL = os.environ.get(
    "TRACKING_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_TEST_URL = os.environ.get("TRACKING_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def database_url(name: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def run_in_thread(call) -> None:
    """Run ``call`` in a thread of its own (fixtures may sit inside a running loop)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def admin_execute(statement: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)


def bench_production_flags() -> list[str]:
    """The flags that point a benchmark program (bench/load.py, bench/burst.py) at
    the test PostgreSQL and Redis; a missing PostgreSQL skips, or fails in CI."""
    try:
        admin_execute("SELECT 1")
    except Exception as exc:
        require_service("postgres", str(exc))
    return [
        "--production",
        *("--pg-admin-url", PG_ADMIN_URL),
        *("--redis-url", REDIS_TEST_URL),
    ]


def create_database(name: str, template: str = "template1") -> str:
    admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return database_url(name)


def drop_database(name: str) -> None:
    admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_session_prefix() -> Iterator[str]:
    """A prefix for every database this session creates; all are dropped at the end."""
    try:
        admin_execute("SELECT 1")
    except psycopg.OperationalError as exc:
        require_service("PostgreSQL", f"{PG_ADMIN_URL}: {exc}")
    prefix = f"trk_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    yield prefix
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        names = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", [prefix + "%"]
        ).fetchall()
        for (name,) in sorted(names, key=lambda row: "template" in row[0]):
            if "template" in name:
                conn.execute(f'ALTER DATABASE "{name}" IS_TEMPLATE false')
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_template(pg_session_prefix: str) -> str:
    """A migrated template database: clones of it are ready to use at once."""
    name = f"{pg_session_prefix}_template"
    url = create_database(name)
    run_in_thread(lambda: asyncio.run(schema.migrate(url)))
    admin_execute(f'ALTER DATABASE "{name}" IS_TEMPLATE true')
    return name


@pytest.fixture(scope="session")
def pg_url(pg_session_prefix: str, pg_template: str) -> str:
    """URL of the session's migrated database."""
    return create_database(f"{pg_session_prefix}_main", template=pg_template)


@pytest.fixture
def pg_blank_url(pg_session_prefix: str) -> Iterator[str]:
    """URL of a new database that has never been migrated (dropped after the test)."""
    name = f"{pg_session_prefix}_{uuid.uuid4().hex[:8]}"
    yield create_database(name)
    drop_database(name)


@pytest.fixture
def private_pg_url(pg_session_prefix: str, pg_template: str) -> Iterator[str]:
    """A migrated database of this test alone (for a purge, which spares no
    tenant, or a count of every stored row), dropped after the test."""
    name = f"{pg_session_prefix}_{uuid.uuid4().hex[:8]}"
    yield create_database(name, template=pg_template)
    drop_database(name)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        require_service("Redis", f"{REDIS_TEST_URL}: {exc}")
    finally:
        client.close()
    return REDIS_TEST_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    prefix = f"trktest-{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def stream_owners(settings: Settings) -> list[tuple[str, str]]:
    """(tenant, device) of each entry of the Redis Stream of geofence events of a
    server with ``settings``."""
    from tracking_grpc.servicers.geofence import GEOFENCE_STREAM

    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        entries = await client.xrange(settings.redis_key_prefix + GEOFENCE_STREAM)
    finally:
        await client.aclose()
    return [(fields["tenant"], fields["device_id"]) for _, fields in entries]


async def on_the_stream(settings: Settings, owners: set[tuple[str, str]]) -> None:
    """Wait until the publisher has put events of each owner on the stream."""
    async with asyncio.timeout(30):
        while True:
            if owners <= set(await stream_owners(settings)):
                return
            await asyncio.sleep(0.05)


def unique_tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A Redis Cluster of three masters on loopback ports; yields the node URLs."""
    from tests.services import RedisServer, create_cluster

    workdir = tmp_path_factory.mktemp("redis-cluster")
    try:
        nodes = [RedisServer(workdir, cluster=True) for _ in range(3)]
    except FileNotFoundError as exc:
        require_service("redis-server", str(exc))
    try:
        for node in nodes:
            node.start()
        create_cluster(nodes)
        yield [node.url for node in nodes]
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def production_env(pg_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    """Environment of a server process on the session's database and Redis prefix."""
    return {
        "TRACKING_DATABASE_URL": pg_url,
        "TRACKING_REDIS_URL": redis_url,
        "TRACKING_REDIS_KEY_PREFIX": redis_prefix,
        "TRACKING_FLUSH_INTERVAL_MS": "1",
    }


@pytest.fixture(params=["redis", "redis-cluster"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of a standalone Redis, then of a Redis Cluster node."""
    if request.param == "redis-cluster":
        return request.getfixturevalue("redis_cluster")[0]
    return request.getfixturevalue("redis_url")


# Both stores, for tests that run a server on each (the production pair needs both).
BACKENDS = [
    "embedded",
    pytest.param("postgres-redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def history_store(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator:
    """A history store on SQLite in the test's directory, then on the session's
    PostgreSQL database."""
    if request.param == "sqlite":
        store = await SqliteHistoryStore.open(tmp_path / "history.sqlite3")
    else:
        store = await PostgresHistoryStore.open(request.getfixturevalue("pg_url"))
    yield store
    await store.close()


def backend_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """``settings`` on the backend ``request.param`` names (one of BACKENDS)."""
    if request.param != "postgres-redis":
        return settings
    return replace(
        settings,
        database_url=request.getfixturevalue("pg_url"),
        redis_url=request.getfixturevalue("redis_url"),
        redis_key_prefix=request.getfixturevalue("redis_prefix"),
    )
