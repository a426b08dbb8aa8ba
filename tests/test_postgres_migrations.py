"""Migrations outside a transaction: concurrent index builds that let writes through,
and the rebuild of an index that an interrupted build left invalid."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.backends import admin_execute, database_url
from tracking_grpc.errors import StorageUnavailable
from tracking_grpc.storage import schema

EVENT_INDEXES = {
    6: "geofence_events_device",
    9: "geofence_events_memberships",
    10: "geofence_events_route",
}
MIGRATE_APP = "trk-migrate-test"
ROOT = Path(__file__).resolve().parents[1]
INSERT_EVENT = (
    "INSERT INTO geofence_events (tenant, event_id, device, fence_id, type, time_ms,"
    " lat, lon, fix_seq, created_ms) VALUES ('t', %s, 'd', 'f', 1, 1, 0, 0, 1, 1)"
)


def test_statements_skip_comments_and_quoted_semicolons() -> None:
    text = "-- a; comment\nSELECT 'x;y' /* ; */ ;\nSELECT $f$ ; $f$; -- end;\n"
    assert schema.statements(text) == ["SELECT 'x;y'", "SELECT $f$ ; $f$"]


def test_a_plain_index_outside_a_transaction_is_refused() -> None:
    migration = schema.Migration(
        99, "x", f"{schema.NO_TRANSACTION}\nCREATE INDEX i ON t (a);"
    )
    with pytest.raises(RuntimeError, match="CONCURRENTLY IF NOT EXISTS"):
        schema.check_rerunnable(migration)


def invalid_indexes(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid"
        ).fetchall()
    return [row[0] for row in rows]


def index_is_valid(url: str, name: str) -> bool | None:
    """None if there is no such index."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", [name]
        ).fetchone()
    return None if row is None else row[0]


async def test_a_fresh_database_gets_valid_event_indexes_built_concurrently(
    pg_blank_url,
) -> None:
    by_version = {m.version: m for m in schema.available()}
    for version, index in EVENT_INDEXES.items():
        migration = by_version[version]
        assert not migration.transaction
        create = [s for s in schema.statements(migration.sql) if index in s]
        assert create and create[0].startswith("CREATE INDEX CONCURRENTLY")
    assert await schema.migrate(pg_blank_url) == sorted(by_version)
    for index in EVENT_INDEXES.values():
        assert index_is_valid(pg_blank_url, index)
    assert invalid_indexes(pg_blank_url) == []


def at_version_9(url: str) -> None:
    """A migrated database as it was before migration 0010."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP INDEX geofence_events_route")
        conn.execute("DELETE FROM schema_migrations WHERE version = 10")


async def held_migrate(url: str, blocker: psycopg.AsyncConnection) -> asyncio.Task:
    """A migrate of 0010 started while ``blocker`` holds an uncommitted write to the
    events table; returned once the migrate waits for it (a concurrent build waits
    for older writers, a plain one for its table lock)."""
    await blocker.execute(INSERT_EVENT, ["old"])
    task = asyncio.create_task(
        schema.migrate(make_conninfo(url, application_name=MIGRATE_APP))
    )
    deadline = time.monotonic() + 20
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as probe:
        while time.monotonic() < deadline:
            cur = await probe.execute(
                "SELECT 1 FROM pg_stat_activity"
                " WHERE application_name = %s AND wait_event_type = 'Lock'",
                [MIGRATE_APP],
            )
            if await cur.fetchone():
                return task
            await asyncio.sleep(0.05)
    task.cancel()
    raise TimeoutError("the migrate never waited for the open write")


async def migrate_locks(conn: psycopg.AsyncConnection) -> set[tuple[str, bool]]:
    """The locks that the migrate holds or wants on the events table."""
    cur = await conn.execute(
        "SELECT l.mode, l.granted FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE a.application_name = %s AND l.relation = 'geofence_events'::regclass",
        [MIGRATE_APP],
    )
    return {(mode, granted) for mode, granted in await cur.fetchall()}


async def test_an_index_build_lets_writes_to_its_table_through(pg_blank_url) -> None:
    await schema.migrate(pg_blank_url)
    at_version_9(pg_blank_url)
    url = pg_blank_url
    async with (
        await psycopg.AsyncConnection.connect(url) as blocker,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as writer,
    ):
        task = await held_migrate(url, blocker)
        try:
            # SHARE UPDATE EXCLUSIVE does not conflict with the ROW EXCLUSIVE of a
            # write; the SHARE lock of a plain CREATE INDEX does, and writers queue
            # behind it.
            assert await migrate_locks(writer) == {("ShareUpdateExclusiveLock", True)}
            await writer.execute("SET lock_timeout = '3s'")
            await writer.execute(INSERT_EVENT, ["new"])
        finally:
            await blocker.commit()
            applied = await task
    assert applied == [10]
    assert index_is_valid(url, "geofence_events_route")


async def test_an_invalid_leftover_index_is_rebuilt(pg_blank_url) -> None:
    await schema.migrate(pg_blank_url)
    with psycopg.connect(pg_blank_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE pg_index SET indisvalid = false"
            " WHERE indexrelid = 'geofence_events_route'::regclass"
        )
        conn.execute("DELETE FROM schema_migrations WHERE version = 10")
    assert await schema.migrate(pg_blank_url) == [10]
    assert index_is_valid(pg_blank_url, "geofence_events_route")


async def test_a_cancelled_build_is_finished_by_the_next_migrate(pg_blank_url) -> None:
    await schema.migrate(pg_blank_url)
    at_version_9(pg_blank_url)
    url = pg_blank_url
    async with await psycopg.AsyncConnection.connect(url) as blocker:
        task = await held_migrate(url, blocker)
        await blocker.execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s",
            [MIGRATE_APP],
        )
        with pytest.raises(StorageUnavailable, match="canceling statement"):
            await task
        await blocker.commit()
    assert index_is_valid(url, "geofence_events_route") is False
    assert await schema.migrate(url) == [10]
    assert index_is_valid(url, "geofence_events_route")


async def test_two_migrates_at_once_apply_each_migration_once(pg_blank_url) -> None:
    # The second waits for the first without holding a snapshot: the first's
    # concurrent index builds would wait for that snapshot, and it for them.
    first, second = await asyncio.gather(
        schema.migrate(pg_blank_url), schema.migrate(pg_blank_url)
    )
    assert sorted(first + second) == [m.version for m in schema.available()]
    assert invalid_indexes(pg_blank_url) == []


def owned_database(postgis: bool) -> Iterator[str]:
    """A database owned by a role that is not a superuser, and that role's URL;
    with ``postgis`` the superuser creates PostGIS in it, as the README's
    deployment step says. Both are dropped afterwards."""
    name = f"trk_owner_{uuid.uuid4().hex[:8]}"
    admin_execute(f'CREATE ROLE "{name}" LOGIN')
    admin_execute(f'CREATE DATABASE "{name}" OWNER "{name}"')
    url = make_conninfo(database_url(name), user=name)
    try:
        if postgis:
            with psycopg.connect(database_url(name), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION postgis")
        yield url
    finally:
        admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin_execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture
def owner_database() -> Iterator[str]:
    yield from owned_database(postgis=True)


@pytest.fixture
def owner_database_without_postgis() -> Iterator[str]:
    yield from owned_database(postgis=False)


@pytest.mark.postgres
async def test_an_owner_without_superuser_migrates_once_postgis_exists(
    owner_database,
) -> None:
    applied = await schema.migrate(owner_database)
    assert applied == [m.version for m in schema.available()]
    assert await schema.migrate(owner_database) == []


def run_migrate(url: str) -> subprocess.CompletedProcess[str]:
    """``tracking migrate`` in a process of its own, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKING_")}
    command = [sys.executable, "-m", "tracking_grpc", "migrate", "--database-url", url]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed migrate ends with (exit 2, no traceback)."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.splitlines()[-1]


@pytest.mark.postgres
def test_migrate_by_an_owner_who_may_not_create_postgis_says_what_to_do(
    owner_database_without_postgis,
) -> None:
    done = run_migrate(owner_database_without_postgis)
    user = conninfo_to_dict(owner_database_without_postgis)["user"]
    assert refusal(done) == (
        f'tracking: role "{user}" may not create the PostGIS extension in database '
        f'"{user}": a superuser runs `CREATE EXTENSION postgis` once in that '
        "database, then run `tracking migrate` again"
    )


@pytest.fixture
def stranger_role() -> Iterator[tuple[str, str]]:
    """A database of the superuser's, with PostGIS, and a role that may log in but
    was granted nothing in it: the names of both. Both are dropped afterwards."""
    name = f"trk_stranger_{uuid.uuid4().hex[:8]}"
    admin_execute(f'CREATE ROLE "{name}" LOGIN')
    admin_execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(database_url(name), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION postgis")
        yield name, name
    finally:
        admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin_execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.mark.postgres
def test_migrate_by_a_role_that_may_not_create_tables_says_what_to_do(
    stranger_role,
) -> None:
    database, role = stranger_role
    done = run_migrate(make_conninfo(database_url(database), user=role))
    assert refusal(done) == (
        f'tracking: role "{role}" lacks a privilege migrate needs in database '
        f'"{database}" (permission denied for schema public): the database\'s owner '
        f'or a superuser runs `GRANT USAGE, CREATE ON SCHEMA public TO "{role}"`, or '
        "migrate as the database's owner, then run `tracking migrate` again"
    )
    with psycopg.connect(database_url(database), autocommit=True) as conn:
        conn.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{role}"')  # as told
    assert run_migrate(make_conninfo(database_url(database), user=role)).returncode == 0


@pytest.mark.postgres
def test_migrate_by_a_role_that_may_not_use_the_tables_says_what_to_do(
    stranger_role,
) -> None:
    """The schema was migrated by another role, whose tables this one may not read."""
    database, role = stranger_role
    with psycopg.connect(database_url(database), autocommit=True) as conn:
        conn.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{role}"')
    asyncio.run(schema.migrate(database_url(database)))
    done = run_migrate(make_conninfo(database_url(database), user=role))
    assert refusal(done) == (
        f'tracking: role "{role}" lacks a privilege migrate needs in database '
        f'"{database}" (permission denied for table schema_migrations): migrate as '
        "the role that owns the database and its tables (README: Scaling out), or "
        "have a superuser grant the privilege, then run `tracking migrate` again"
    )


@pytest.mark.postgres
def test_migrate_by_a_role_that_may_not_connect_says_what_to_do(stranger_role) -> None:
    database, role = stranger_role
    admin_execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC')
    done = run_migrate(make_conninfo(database_url(database), user=role))
    line = refusal(done)
    assert line.startswith("tracking: cannot connect to the database: ")
    assert f'permission denied for database "{database}"' in line
    assert line.endswith(
        f'a superuser grants it with `GRANT CONNECT ON DATABASE "{database}" TO '
        f'"{role}"`, then run `tracking migrate` again'
    )


def test_migrate_where_no_server_listens_says_what_to_do() -> None:
    with socket.socket() as bound:  # a port of ours that accepts no connection
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        done = run_migrate(f"postgresql://postgres@127.0.0.1:{port}/tracking")
    line = refusal(done)
    assert line.startswith("tracking: cannot connect to the database: ")
    assert "Connection refused" in line
    assert line.endswith(
        "check database_url (--database-url or TRACKING_DATABASE_URL) and that "
        "PostgreSQL runs there and accepts connections, then run `tracking migrate` "
        "again"
    )


@pytest.mark.postgres
def test_migrate_of_a_missing_database_says_what_to_do() -> None:
    name = f"trk_missing_{uuid.uuid4().hex[:8]}"  # never created
    line = refusal(run_migrate(database_url(name)))
    assert f'database "{name}" does not exist' in line
    assert line.endswith(
        "create it first (README: Scaling out), or correct database_url, then run "
        "`tracking migrate` again"
    )
