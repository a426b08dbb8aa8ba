"""Embedded fence and event repositories: one SQLite file, one worker thread.

Tables are created idempotently at open (the embedded store has no migrations).
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tracking_grpc.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    StorageUnavailable,
)
from tracking_grpc.events import TrackingEvent
from tracking_grpc.geofence.model import FenceSpec
from tracking_grpc.storage.fences import (
    EVENT_FIELDS,
    MEMBERSHIP_SQL,
    EventQuery,
    ImportResult,
    Memberships,
    event_of_row,
    event_row,
    memberships_of,
    stamped,
)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS geofences (
    tenant TEXT NOT NULL,
    fence_id TEXT NOT NULL,
    spec TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (tenant, fence_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS geofence_labels (
    tenant TEXT NOT NULL,
    label TEXT NOT NULL,
    fence_id TEXT NOT NULL,
    PRIMARY KEY (tenant, label, fence_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS geofence_revisions (
    tenant TEXT PRIMARY KEY,
    revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS geofence_events (
    tenant TEXT NOT NULL,
    event_id TEXT NOT NULL,
    device TEXT NOT NULL,
    fence_id TEXT NOT NULL,
    type INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    lat REAL NOT NULL,
    lon REAL NOT NULL,
    fix_seq INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    attributes TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0,
    route_id TEXT NOT NULL DEFAULT '',
    activity TEXT,
    PRIMARY KEY (tenant, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS geofence_events_unpublished
    ON geofence_events (created_ms) WHERE published = 0;
CREATE INDEX IF NOT EXISTS geofence_events_by_time
    ON geofence_events (tenant, time_ms, event_id);
CREATE INDEX IF NOT EXISTS geofence_events_by_device
    ON geofence_events (tenant, device);
CREATE INDEX IF NOT EXISTS geofence_events_memberships
    ON geofence_events (tenant, device, fence_id) WHERE type IN (1, 2, 3);
CREATE INDEX IF NOT EXISTS geofence_events_by_route
    ON geofence_events (tenant, route_id, time_ms, event_id) WHERE route_id <> '';
"""

# Columns added since the table was first shipped: (name, definition).
ADDED_COLUMNS = (
    ("published", "INTEGER NOT NULL DEFAULT 0"),  # the outbox
    ("route_id", "TEXT NOT NULL DEFAULT ''"),  # route and activity events
    ("activity", "TEXT"),
)


EVENT_COLUMNS = ", ".join(EVENT_FIELDS)


class SqliteGeofenceDatabase:
    """The SQLite file both repositories use; all work runs on one thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-geofence")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> SqliteGeofenceDatabase:
        database = cls(path)
        await database.run(database._open)
        return database

    @classmethod
    def opening(cls, path: Path) -> SqliteGeofenceDatabase:
        """Open from synchronous code: the worker opens the file before any call."""
        database = cls(path)
        database._pool.submit(database._open)
        return database

    def _open(self) -> None:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA journal_mode=WAL")
        # Fences are written rarely; events are many and can be raised again from
        # history. NORMAL in WAL mode loses nothing when the process dies, only
        # (at most) the last transactions on power loss.
        conn.execute("PRAGMA synchronous=NORMAL")
        columns = {r[1] for r in conn.execute("PRAGMA table_info(geofence_events)")}
        for name, definition in ADDED_COLUMNS:
            if columns and name not in columns:  # a file from before the column
                conn.execute(
                    f"ALTER TABLE geofence_events ADD COLUMN {name} {definition}"
                )
        conn.executescript(SCHEMA)
        self._conn = conn

    def _connection(self) -> sqlite3.Connection:
        """The worker's connection; opened here if an earlier open failed (a file
        locked by another handle at start-up), so the error reaches a caller."""
        if self._conn is None:
            self._open()
        assert self._conn is not None
        return self._conn

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"sqlite: {exc}") from exc

    def transaction(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(conn, *args) in one write transaction (on the worker thread)."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def read(self, sql: str, args: Sequence[Any]) -> list[tuple]:
        return self._connection().execute(sql, args).fetchall()

    async def close(self) -> None:
        if self._conn is not None:
            await self.run(self._conn.close)
            self._conn = None
        self._pool.shutdown(wait=True)


class SqliteFenceRepository:
    """FenceRepository on the embedded database."""

    def __init__(self, database: SqliteGeofenceDatabase) -> None:
        self.db = database

    async def create(self, tenant: str, fence: FenceSpec, now_ms: int) -> FenceSpec:
        result = await self.import_many(tenant, [fence], now_ms, False)
        return result.fences[0]

    async def update(
        self, tenant: str, fence: FenceSpec, now_ms: int, expected_version: int = 0
    ) -> FenceSpec:
        return await self.db.run(
            self.db.transaction, _update, tenant, fence, now_ms, expected_version
        )

    async def import_many(
        self,
        tenant: str,
        fences: Sequence[FenceSpec],
        now_ms: int,
        replace_existing: bool,
    ) -> ImportResult:
        return await self.db.run(
            self.db.transaction, _import, tenant, list(fences), now_ms, replace_existing
        )

    async def delete(self, tenant: str, fence_id: str) -> None:
        await self.db.run(self.db.transaction, _delete, tenant, fence_id)

    async def get(self, tenant: str, fence_id: str) -> FenceSpec:
        rows = await self.db.run(
            self.db.read,
            "SELECT spec FROM geofences WHERE tenant = ? AND fence_id = ?",
            (tenant, fence_id),
        )
        if not rows:
            raise NotFound(f"no fence {fence_id!r}")
        return FenceSpec.from_json(rows[0][0])

    async def list(
        self, tenant: str, labels: Sequence[str], limit: int, after: str = ""
    ) -> list[FenceSpec]:
        wanted = sorted(set(labels))
        sql = "SELECT spec FROM geofences WHERE tenant = ? AND fence_id > ?"
        args: list[Any] = [tenant, after]
        if wanted:
            marks = ", ".join("?" * len(wanted))
            sql += (
                " AND fence_id IN (SELECT fence_id FROM geofence_labels WHERE "
                f"tenant = ? AND label IN ({marks}) GROUP BY fence_id "
                "HAVING count(*) = ?)"
            )
            args += [tenant, *wanted, len(wanted)]
        rows = await self.db.run(
            self.db.read, sql + " ORDER BY fence_id LIMIT ?", [*args, limit]
        )
        return [FenceSpec.from_json(r[0]) for r in rows]

    async def all(self, tenant: str) -> builtins.list[FenceSpec]:
        rows = await self.db.run(
            self.db.read,
            "SELECT spec FROM geofences WHERE tenant = ? ORDER BY fence_id",
            (tenant,),
        )
        return [FenceSpec.from_json(r[0]) for r in rows]

    async def revision(self, tenant: str) -> int:
        rows = await self.db.run(
            self.db.read,
            "SELECT revision FROM geofence_revisions WHERE tenant = ?",
            (tenant,),
        )
        return int(rows[0][0]) if rows else 0

    async def tenants(self) -> builtins.list[str]:
        sql = "SELECT tenant FROM geofence_revisions ORDER BY tenant"
        return [row[0] for row in await self.db.run(self.db.read, sql, ())]

    async def close(self) -> None:
        return None


class SqliteEventRepository:
    """EventRepository on the embedded database."""

    def __init__(self, database: SqliteGeofenceDatabase) -> None:
        self.db = database

    async def add(self, events: Sequence[TrackingEvent]) -> int:
        if not events:
            return 0
        return await self.db.run(self.db.transaction, _add_events, list(events))

    async def list(self, query: EventQuery) -> list[TrackingEvent]:
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM geofence_events WHERE tenant = ? "
            "AND time_ms >= ? AND time_ms < ?"
        )
        args: list[Any] = [query.tenant, query.start_ms, query.end_ms]
        if query.device:
            sql, args = sql + " AND device = ?", [*args, query.device]
        if query.fence_id:
            sql, args = sql + " AND fence_id = ?", [*args, query.fence_id]
        if query.route_id:  # with the predicate of geofence_events_by_route
            sql += " AND route_id = ? AND route_id <> ''"
            args.append(query.route_id)
        if query.types:
            kinds = sorted(int(t) for t in query.types)
            sql += f" AND type IN ({', '.join('?' * len(kinds))})"
            args += kinds
        if query.after is not None:
            sql += " AND (time_ms > ? OR (time_ms = ? AND event_id > ?))"
            args += [query.after[0], query.after[0], query.after[1]]
        sql += " ORDER BY time_ms, event_id LIMIT ?"
        rows = await self.db.run(self.db.read, sql, [*args, query.limit])
        return [event_of_row(row) for row in rows]

    async def memberships(
        self, tenant: str, devices: Sequence[str] | None = None
    ) -> Memberships:
        if devices is None:
            sql = MEMBERSHIP_SQL.format(mark="?", devices="")
            return memberships_of(await self.db.run(self.db.read, sql, [tenant]))
        if not devices:
            return Memberships([], {})
        # One parameter however many devices (SQLite caps the number of them).
        some = " AND device IN (SELECT value FROM json_each(?))"
        sql = MEMBERSHIP_SQL.format(mark="?", devices=some)
        args = [tenant, json.dumps(list(devices))]
        return memberships_of(await self.db.run(self.db.read, sql, args))

    async def unpublished(self, limit: int) -> builtins.list[TrackingEvent]:
        rows = await self.db.run(
            self.db.read,
            f"SELECT {EVENT_COLUMNS} FROM geofence_events WHERE published = 0 "
            "ORDER BY created_ms, time_ms, event_id LIMIT ?",
            [limit],
        )
        return [event_of_row(row) for row in rows]

    async def mark_published(self, events: Sequence[TrackingEvent]) -> None:
        await self.db.run(self.db.transaction, _mark_published, list(events))

    async def erase_device(self, tenant: str, device: str) -> int:
        sql = "DELETE FROM geofence_events WHERE tenant = ? AND device = ?"
        return await self.db.run(self.db.transaction, _deleted, sql, [tenant, device])

    async def purge_before(self, cutoff_ms: int) -> int:
        sql = "DELETE FROM geofence_events WHERE time_ms < ?"
        return await self.db.run(self.db.transaction, _deleted, sql, [cutoff_ms])

    async def close(self) -> None:
        return None


def _bump(conn: sqlite3.Connection, tenant: str) -> None:
    conn.execute(
        "INSERT INTO geofence_revisions (tenant, revision) VALUES (?, 1) "
        "ON CONFLICT (tenant) DO UPDATE SET revision = revision + 1",
        (tenant,),
    )


def _write(conn: sqlite3.Connection, tenant: str, fence: FenceSpec) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO geofences (tenant, fence_id, spec, version) "
        "VALUES (?, ?, ?, ?)",
        (tenant, fence.fence_id, fence.to_json(), fence.version),
    )
    conn.execute(
        "DELETE FROM geofence_labels WHERE tenant = ? AND fence_id = ?",
        (tenant, fence.fence_id),
    )
    conn.executemany(
        "INSERT OR IGNORE INTO geofence_labels (tenant, label, fence_id) "
        "VALUES (?, ?, ?)",
        [(tenant, label, fence.fence_id) for label in fence.labels],
    )


def _stored(conn: sqlite3.Connection, tenant: str, fence_id: str) -> FenceSpec | None:
    row = conn.execute(
        "SELECT spec FROM geofences WHERE tenant = ? AND fence_id = ?",
        (tenant, fence_id),
    ).fetchone()
    return FenceSpec.from_json(row[0]) if row else None


def _import(
    conn: sqlite3.Connection,
    tenant: str,
    fences: list[FenceSpec],
    now_ms: int,
    replace_existing: bool,
) -> ImportResult:
    written, created, replaced = [], 0, 0
    for fence in fences:
        old = _stored(conn, tenant, fence.fence_id)
        if old is not None and not replace_existing:
            raise AlreadyExists(f"fence {fence.fence_id!r} exists")
        if old is None:
            fence = stamped(fence, 1, now_ms, now_ms)
            created += 1
        else:
            fence = stamped(fence, old.version + 1, now_ms, old.created_ms)
            replaced += 1
        _write(conn, tenant, fence)
        written.append(fence)
    _bump(conn, tenant)
    return ImportResult(written, created, replaced)


def _update(
    conn: sqlite3.Connection,
    tenant: str,
    fence: FenceSpec,
    now_ms: int,
    expected_version: int,
) -> FenceSpec:
    old = _stored(conn, tenant, fence.fence_id)
    if old is None:
        raise NotFound(f"no fence {fence.fence_id!r}")
    if expected_version and old.version != expected_version:
        raise FailedPrecondition(
            f"fence {fence.fence_id!r} is at version {old.version}, "
            f"not {expected_version}"
        )
    fence = stamped(fence, old.version + 1, now_ms, old.created_ms)
    _write(conn, tenant, fence)
    _bump(conn, tenant)
    return fence


def _delete(conn: sqlite3.Connection, tenant: str, fence_id: str) -> None:
    cur = conn.execute(
        "DELETE FROM geofences WHERE tenant = ? AND fence_id = ?", (tenant, fence_id)
    )
    if cur.rowcount == 0:
        raise NotFound(f"no fence {fence_id!r}")
    conn.execute(
        "DELETE FROM geofence_labels WHERE tenant = ? AND fence_id = ?",
        (tenant, fence_id),
    )
    _bump(conn, tenant)


def _add_events(conn: sqlite3.Connection, events: list[TrackingEvent]) -> int:
    before = conn.total_changes
    marks = ", ".join("?" * len(EVENT_FIELDS))
    conn.executemany(
        f"INSERT OR IGNORE INTO geofence_events ({EVENT_COLUMNS}) VALUES ({marks})",
        [event_row(e) for e in events],
    )
    return conn.total_changes - before


def _deleted(conn: sqlite3.Connection, sql: str, args: list[Any]) -> int:
    return int(conn.execute(sql, args).rowcount)


def _mark_published(conn: sqlite3.Connection, events: list[TrackingEvent]) -> None:
    conn.executemany(
        "UPDATE geofence_events SET published = 1 WHERE tenant = ? AND event_id = ?",
        [(e.tenant, e.event_id) for e in events],
    )
