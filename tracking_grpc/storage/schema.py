"""Versioned migrations of the PostgreSQL schema, and the start-up check.

Migrations are the numbered SQL files in ``migrations/`` (``0001_history.sql``...),
applied in order by ``tracking migrate``; the table ``schema_migrations`` records
which ran. A server refuses to start on a database that is behind, so that no process
writes through a schema it does not expect. The check compares version numbers only,
never the text of a migration.

A migration runs in its own transaction, unless its first line is the marker
``-- tracking: no transaction``. Such a migration runs statement by statement in
autocommit mode, so that it can build indexes with ``CREATE INDEX CONCURRENTLY``,
which does not block writes to the table (it takes SHARE UPDATE EXCLUSIVE, not the
SHARE of a plain build); its version is recorded once every statement succeeded. Its
statements must therefore be re-runnable (``IF NOT EXISTS``), and every index it
creates is ``CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS name``: an interrupted
build leaves an INVALID index of that name, which the next ``migrate`` drops and
builds again. Partitioned tables (``fixes``) cannot be indexed concurrently.

One ``migrate`` runs at a time: each holds a session advisory lock for its whole run.
A waiting one polls for the lock between statements instead of blocking in one,
because a concurrent index build waits for every transaction with an older snapshot,
a blocked waiter's too, which would deadlock.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg
import sqlparse
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from tracking_grpc.errors import FailedPrecondition, StorageUnavailable

log = logging.getLogger(__name__)

FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
LOCK_KEY = 0x7472_6B6D  # pg_advisory_lock key of migrate: "trkm"
LOCK_POLL_S = 0.5
NO_TRANSACTION = "-- tracking: no transaction"

ANY_INDEX = re.compile(r"CREATE\s+(?:UNIQUE\s+)?INDEX\b", re.IGNORECASE)
CONCURRENT_INDEX = re.compile(
    r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+"
    r"(\"(?:\"\"|[^\"])+\"|\w+)",
    re.IGNORECASE,
)

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
RECORD = "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)"
# The index of that name (as CREATE INDEX resolves it) if it is invalid.
INVALID_INDEX = """
SELECT n.nspname, c.relname
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.indexrelid = to_regclass(%s) AND NOT i.indisvalid
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def transaction(self) -> bool:
        """False for a migration marked to run outside a transaction."""
        return self.sql.partition("\n")[0].strip() != NO_TRANSACTION


def statements(text: str) -> list[str]:
    """The statements of an SQL script, without comments or the closing ``;``."""
    found = (
        sqlparse.format(piece, strip_comments=True).strip().rstrip(";").rstrip()
        for piece in sqlparse.split(text)
    )
    return [statement for statement in found if statement]


def check_rerunnable(migration: Migration) -> None:
    """Raise unless each index of a no-transaction migration is built concurrently
    and only if missing (the rebuild of an invalid one needs its name)."""
    if migration.transaction:
        return
    for statement in statements(migration.sql):
        if ANY_INDEX.match(statement) and not CONCURRENT_INDEX.match(statement):
            raise RuntimeError(
                f"migration {migration.version:04d} runs outside a transaction: its "
                "indexes need CREATE INDEX CONCURRENTLY IF NOT EXISTS name"
            )


def available() -> list[Migration]:
    """Every migration shipped with the package, by version."""
    folder = resources.files("tracking_grpc.storage").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = FILE_NAME.match(entry.name)
        if match:
            version, name = int(match[1]), match[2]
            found.append(Migration(version, name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if len({m.version for m in found}) != len(found):
        raise RuntimeError("two migrations share a version number")
    for migration in found:
        check_rerunnable(migration)
    return found


async def current_version(conn: psycopg.AsyncConnection) -> int:
    """The newest applied migration; 0 for a database never migrated."""
    cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return 0
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(url: str) -> list[int]:
    """Apply pending migrations to the database at ``url``; returns their versions.

    A connection or permission failure raises with one line that says what to do:
    StorageUnavailable when the database cannot be reached (or is lost on the way),
    FailedPrecondition when the role lacks a privilege a migration needs."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    except psycopg.OperationalError as exc:
        raise StorageUnavailable(cannot_connect(url, exc)) from exc
    async with conn:
        try:
            await _lock(conn)  # released as the connection closes
            await conn.execute(CREATE_LEDGER)
            return await _apply_pending(conn)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise FailedPrecondition(refused(conn, exc)) from exc
        except psycopg.OperationalError as exc:
            raise StorageUnavailable(
                f"cannot migrate the database: {one_line(exc)}; run `tracking "
                "migrate` again once the database is reachable (it resumes where "
                "it stopped)"
            ) from exc


def one_line(exc: psycopg.Error) -> str:
    """libpq's message on one line (it spreads a reason over DETAIL/HINT lines)."""
    return " ".join(str(exc).split())


# What to do about a refused connection, by a piece of the server's message.
CONNECT_ADVICE = (
    (
        "does not have CONNECT privilege",
        "a superuser grants it with "
        '`GRANT CONNECT ON DATABASE "{database}" TO "{role}"`',
    ),
    (
        "does not exist",
        "create it first (README: Scaling out), or correct database_url",
    ),
    ("not permitted to log in", 'a superuser runs `ALTER ROLE "{role}" LOGIN`'),
    ("authentication failed", "correct the user or password in database_url"),
)
CONNECT_CHECK = (
    "check database_url (--database-url or TRACKING_DATABASE_URL) and that "
    "PostgreSQL runs there and accepts connections"
)


def cannot_connect(url: str, exc: psycopg.OperationalError) -> str:
    reason = one_line(exc).removeprefix("connection failed: ").rstrip(".")
    advice = next(
        (advice for piece, advice in CONNECT_ADVICE if piece in reason), CONNECT_CHECK
    )
    given = conninfo_to_dict(url)
    advice = advice.format(
        database=given.get("dbname", "name"), role=given.get("user", "role")
    )
    return (
        f"cannot connect to the database: {reason}; {advice}, then run "
        "`tracking migrate` again"
    )


def refused(
    conn: psycopg.AsyncConnection, exc: psycopg.errors.InsufficientPrivilege
) -> str:
    """One line naming the privilege the role lacks and who can give it."""
    user, database = conn.info.user, conn.info.dbname
    reason = exc.diag.message_primary or one_line(exc)
    if "extension" in reason:
        return (
            f'role "{user}" may not create the PostGIS extension in '
            f'database "{database}": a superuser runs '
            "`CREATE EXTENSION postgis` once in that database, then run "
            "`tracking migrate` again"
        )
    schema = re.search(r"permission denied for schema (\S+)", reason)
    if schema:
        advice = (
            "the database's owner or a superuser runs `GRANT USAGE, CREATE ON "
            f'SCHEMA {schema[1]} TO "{user}"`, or migrate as the database\'s owner'
        )
    else:
        advice = (
            "migrate as the role that owns the database and its tables (README: "
            "Scaling out), or have a superuser grant the privilege"
        )
    return (
        f'role "{user}" lacks a privilege migrate needs in database '
        f'"{database}" ({reason}): {advice}, then run `tracking migrate` again'
    )


async def _lock(conn: psycopg.AsyncConnection) -> None:
    """Take migrate's session lock, polling: no snapshot is held while waiting."""
    waiting = False
    while True:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY])
        row = await cur.fetchone()
        if row and row[0]:
            return
        if not waiting:
            log.info("another migrate is running: waiting for it to finish")
            waiting = True
        await asyncio.sleep(LOCK_POLL_S)


async def _apply_pending(conn: psycopg.AsyncConnection) -> list[int]:
    cur = await conn.execute("SELECT version FROM schema_migrations")
    done = {row[0] for row in await cur.fetchall()}
    applied = []
    for migration in available():
        if migration.version in done:
            continue
        if migration.transaction:
            async with conn.transaction():
                await conn.execute(migration.sql.encode())
                await conn.execute(RECORD, [migration.version, migration.name])
        else:
            await _apply_outside_transaction(conn, migration)
        log.info("applied migration %04d %s", migration.version, migration.name)
        applied.append(migration.version)
    return applied


async def _apply_outside_transaction(
    conn: psycopg.AsyncConnection, migration: Migration
) -> None:
    """Each statement on its own (autocommit), then the version."""
    for statement in statements(migration.sql):
        await _drop_if_invalid(conn, statement)
        await conn.execute(statement.encode())
    await conn.execute(RECORD, [migration.version, migration.name])


async def _drop_if_invalid(conn: psycopg.AsyncConnection, statement: str) -> None:
    """Drop the INVALID index an interrupted run of this concurrent build left, so
    that the statement (IF NOT EXISTS) builds it again instead of skipping it."""
    match = CONCURRENT_INDEX.match(statement)
    if not match:
        return
    cur = await conn.execute(INVALID_INDEX, [match[1]])
    row = await cur.fetchone()
    if row is None:
        return
    log.warning("index %s.%s is invalid (an interrupted build): rebuilding it", *row)
    drop = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(*row))
    await conn.execute(drop)


async def check(conn: psycopg.AsyncConnection) -> None:
    """Raise FailedPrecondition unless every shipped migration has been applied."""
    have = await current_version(conn)
    want = available()[-1].version
    if have < want:
        raise FailedPrecondition(
            f"database schema is at version {have}, this server needs {want}: "
            "run `tracking migrate` first"
        )
    if have > want:
        raise FailedPrecondition(
            f"database schema is at version {have}, newer than this server's {want}: "
            "upgrade the server"
        )
