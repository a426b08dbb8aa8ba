"""Versioned migrations of the PostgreSQL schema, and the start-up check.

Migrations are the numbered SQL files in ``migrations/`` (``0001_history.sql``...),
applied in order, each in its own transaction, by ``tracking migrate``; the table
``schema_migrations`` records which ran. A server refuses to start on a database
that is behind, so that no process writes through a schema it does not expect.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

from tracking_grpc.errors import FailedPrecondition, StorageUnavailable

log = logging.getLogger(__name__)

FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
LOCK_KEY = 0x7472_6B6D  # pg_advisory_xact_lock key of migrate: "trkm"

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


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
    """Apply pending migrations to the database at ``url``; returns their versions."""
    applied = []
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(CREATE_LEDGER)
            for migration in available():
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK_KEY])
                    cur = await conn.execute(
                        "SELECT 1 FROM schema_migrations WHERE version = %s",
                        [migration.version],
                    )
                    if await cur.fetchone():
                        continue
                    await conn.execute(migration.sql.encode())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        [migration.version, migration.name],
                    )
                log.info("applied migration %04d %s", migration.version, migration.name)
                applied.append(migration.version)
    except psycopg.OperationalError as exc:
        raise StorageUnavailable(f"cannot migrate the database: {exc}") from exc
    return applied


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
