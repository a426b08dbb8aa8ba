"""Fence and event repositories on PostgreSQL with PostGIS.

The tables come from the migrations ``migrations/0002_geofence.sql``,
``0009_device_events.sql`` and ``0010_events_by_route.sql`` (applied by ``tracking
migrate``; tests apply them to their private databases). Each fence's area is stored
as a PostGIS geometry with a GiST index, for spatial queries in SQL.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
from collections.abc import Sequence
from importlib import resources
from typing import Any

import psycopg
import shapely
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from tracking_grpc.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    StorageUnavailable,
)
from tracking_grpc.events import TrackingEvent
from tracking_grpc.geofence.model import FenceSpec
from tracking_grpc.geofence.shapes import compile_shape
from tracking_grpc.storage import schema
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
from tracking_grpc.storage.postgres import (
    CANCELLED_BY_SERVER,
    CONNECTION_ERRORS,
    RECONNECT_TIMEOUT_S,
    cancelled_read,
    set_lock_timeout,
)

log = logging.getLogger(__name__)

MIGRATIONS = (
    "0002_geofence.sql",
    "0009_device_events.sql",
    "0010_events_by_route.sql",
)
# Columns as the repository selects them (EVENT_FIELDS, JSON as text).
SELECTED = (
    "tenant, event_id, device, fence_id, type, time_ms, lat, lon, fix_seq, "
    "created_ms, attributes::text, route_id, activity::text"
)


def migration_statements() -> list[str]:
    """The DDL of the geofence and event tables (idempotent), one statement each:
    to run in autocommit mode (some build indexes concurrently)."""
    folder = resources.files("tracking_grpc.storage").joinpath("migrations")
    return [
        statement
        for name in MIGRATIONS
        for statement in schema.statements(
            folder.joinpath(name).read_text(encoding="utf-8")
        )
    ]


class PostgresGeofenceDatabase:
    """A connection pool shared by the fence and event repositories."""

    def __init__(self, url: str, max_size: int = 4, timeout_s: float = 30.0) -> None:
        self.url = url
        self.max_size = max_size
        self.timeout_s = timeout_s
        self.pool = self._new_pool()
        self._opened = False
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, url: str, max_size: int = 4, timeout_s: float = 30.0
    ) -> PostgresGeofenceDatabase:
        database = cls(url, max_size, timeout_s)
        await database.ensure_open()
        return database

    async def ensure_open(self) -> None:
        """Open the pool on first use (the server wires services synchronously)."""
        if self._opened:
            return
        async with self._lock:
            if not self._opened:
                try:
                    await self.pool.open(wait=True, timeout=10.0)
                except (psycopg.Error, PoolTimeout) as exc:
                    # A pool cannot be opened twice: the next try gets a fresh one.
                    await self.pool.close()
                    self.pool = self._new_pool()
                    raise StorageUnavailable(f"postgres: {exc}") from exc
                self._opened = True

    def _new_pool(self) -> AsyncConnectionPool:
        # No check on checkout: psycopg_pool sleeps 1, 2, 4, 8 s ... after each
        # connection that fails it, so once the server dropped the pooled
        # connections (a restart, pg_terminate_backend) the next caller slept
        # through every dead one in turn. The geofence processor is such a
        # caller, and the ingest pipeline waits for it: acks stalled for up to
        # the pool's 30 s timeout. A failure checks the whole pool at once
        # instead (``broken``), and the caller tries again on a fresh connection.
        return AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.max_size,
            timeout=self.timeout_s,
            # A statement waiting on a lock gives up as a connection wait does.
            configure=functools.partial(
                set_lock_timeout, lock_timeout_s=self.timeout_s
            ),
            open=False,
            name="geofence",  # in psycopg_pool's log lines
            # Reconnect attempts back off without a cap otherwise: see
            # storage.postgres.RECONNECT_TIMEOUT_S.
            reconnect_timeout=RECONNECT_TIMEOUT_S,
        )

    async def broken(self) -> None:
        """After a connection failed: drop every pooled connection that is broken
        (a restarted server breaks them all), without the check's back-off."""
        try:
            await self.pool.check()
        except Exception:  # the caller reports the failure that brought it here
            log.debug("checking the pool's connections failed", exc_info=True)

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[tuple]:
        await self.ensure_open()
        for attempt in range(2):
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(sql, args)
                    return await cur.fetchall()
            except CANCELLED_BY_SERVER as exc:
                raise cancelled_read(exc) from exc
            except CONNECTION_ERRORS as exc:
                # A read is safe to repeat; once, on a connection made since.
                if attempt or isinstance(exc, PoolTimeout):
                    raise StorageUnavailable(f"postgres: {exc}") from exc
                await self.broken()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._opened:
            await self.pool.close()


class PostgresFenceRepository:
    """FenceRepository on PostGIS."""

    def __init__(self, database: PostgresGeofenceDatabase) -> None:
        self.db = database

    async def create(self, tenant: str, fence: FenceSpec, now_ms: int) -> FenceSpec:
        return (await self.import_many(tenant, [fence], now_ms, False)).fences[0]

    async def update(
        self, tenant: str, fence: FenceSpec, now_ms: int, expected_version: int = 0
    ) -> FenceSpec:
        async with self._transaction() as conn:
            old = await _locked(conn, tenant, [fence.fence_id])
            if fence.fence_id not in old:
                raise NotFound(f"no fence {fence.fence_id!r}")
            version = old[fence.fence_id].version
            if expected_version and version != expected_version:
                raise FailedPrecondition(
                    f"fence {fence.fence_id!r} is at version {version}, "
                    f"not {expected_version}"
                )
            fence = stamped(fence, version + 1, now_ms, old[fence.fence_id].created_ms)
            await _write(conn, tenant, [fence])
            return fence

    async def import_many(
        self,
        tenant: str,
        fences: Sequence[FenceSpec],
        now_ms: int,
        replace_existing: bool,
    ) -> ImportResult:
        async with self._transaction() as conn:
            old = await _locked(conn, tenant, [f.fence_id for f in fences])
            written, created = [], 0
            for fence in fences:
                before = old.get(fence.fence_id)
                if before is not None and not replace_existing:
                    raise AlreadyExists(f"fence {fence.fence_id!r} exists")
                if before is None:
                    created += 1
                    written.append(stamped(fence, 1, now_ms, now_ms))
                else:
                    written.append(
                        stamped(fence, before.version + 1, now_ms, before.created_ms)
                    )
            await _write(conn, tenant, written)
            return ImportResult(written, created, len(written) - created)

    async def delete(self, tenant: str, fence_id: str) -> None:
        async with self._transaction() as conn:
            cur = await conn.execute(
                "DELETE FROM geofences WHERE tenant = %s AND fence_id = %s",
                [tenant, fence_id],
            )
            if cur.rowcount == 0:
                raise NotFound(f"no fence {fence_id!r}")
            await _bump(conn, tenant)

    async def get(self, tenant: str, fence_id: str) -> FenceSpec:
        rows = await self.db.fetch(
            "SELECT spec FROM geofences WHERE tenant = %s AND fence_id = %s",
            [tenant, fence_id],
        )
        if not rows:
            raise NotFound(f"no fence {fence_id!r}")
        return FenceSpec.from_json(rows[0][0])

    async def list(
        self, tenant: str, labels: Sequence[str], limit: int, after: str = ""
    ) -> list[FenceSpec]:
        rows = await self.db.fetch(
            "SELECT spec FROM geofences WHERE tenant = %s "
            'AND fence_id COLLATE "C" > %s '
            'AND labels @> %s::text[] ORDER BY fence_id COLLATE "C" LIMIT %s',
            [tenant, after, sorted(set(labels)), limit],
        )
        return [FenceSpec.from_json(r[0]) for r in rows]

    async def all(self, tenant: str) -> builtins.list[FenceSpec]:
        rows = await self.db.fetch(
            "SELECT spec FROM geofences WHERE tenant = %s ORDER BY fence_id",
            [tenant],
        )
        return [FenceSpec.from_json(r[0]) for r in rows]

    async def revision(self, tenant: str) -> int:
        rows = await self.db.fetch(
            "SELECT revision FROM geofence_revisions WHERE tenant = %s", [tenant]
        )
        return int(rows[0][0]) if rows else 0

    async def tenants(self) -> builtins.list[str]:
        sql = "SELECT tenant FROM geofence_revisions ORDER BY tenant"
        return [row[0] for row in await self.db.fetch(sql, [])]

    async def close(self) -> None:
        return None

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)


class PostgresEventRepository:
    """EventRepository on PostgreSQL."""

    def __init__(self, database: PostgresGeofenceDatabase) -> None:
        self.db = database

    async def add(self, events: Sequence[TrackingEvent]) -> int:
        if not events:
            return 0
        rows = [event_row(e) for e in events]
        async with _Transaction(self.db) as conn:
            cur = await conn.execute(
                f"INSERT INTO geofence_events ({', '.join(EVENT_FIELDS)}) "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], "
                "%s::smallint[], %s::bigint[], %s::float8[], %s::float8[], "
                "%s::bigint[], %s::bigint[], %s::jsonb[], %s::text[], %s::jsonb[]) "
                "ON CONFLICT DO NOTHING",
                [list(column) for column in zip(*rows, strict=True)],
            )
            return cur.rowcount

    async def list(self, query: EventQuery) -> list[TrackingEvent]:
        sql = (
            f"SELECT {SELECTED} FROM geofence_events "
            "WHERE tenant = %s AND time_ms >= %s AND time_ms < %s"
        )
        args: list[Any] = [query.tenant, query.start_ms, query.end_ms]
        if query.device:
            sql, args = sql + " AND device = %s", [*args, query.device]
        if query.fence_id:
            sql, args = sql + " AND fence_id = %s", [*args, query.fence_id]
        if query.route_id:  # with the predicate of the index geofence_events_route
            sql += " AND route_id = %s AND route_id <> ''"
            args.append(query.route_id)
        if query.types:
            sql += " AND type = ANY(%s::smallint[])"
            args.append(sorted(int(t) for t in query.types))
        if query.after is not None:
            sql += ' AND (time_ms, event_id COLLATE "C") > (%s, %s)'
            args += [query.after[0], query.after[1]]
        sql += ' ORDER BY time_ms, event_id COLLATE "C" LIMIT %s'
        rows = await self.db.fetch(sql, [*args, query.limit])
        return [event_of_row(row) for row in rows]

    async def memberships(
        self, tenant: str, devices: Sequence[str] | None = None
    ) -> Memberships:
        if devices is None:
            sql = MEMBERSHIP_SQL.format(mark="%s", devices="")
            return memberships_of(await self.db.fetch(sql, [tenant]))
        if not devices:
            return Memberships([], {})
        some = " AND device = ANY(%s::text[])"
        sql = MEMBERSHIP_SQL.format(mark="%s", devices=some)
        return memberships_of(await self.db.fetch(sql, [tenant, list(devices)]))

    async def unpublished(self, limit: int) -> builtins.list[TrackingEvent]:
        rows = await self.db.fetch(
            f"SELECT {SELECTED} FROM geofence_events "
            'WHERE NOT published ORDER BY created_ms, time_ms, event_id COLLATE "C" '
            "LIMIT %s",
            [limit],
        )
        return [event_of_row(row) for row in rows]

    async def mark_published(self, events: Sequence[TrackingEvent]) -> None:
        async with _Transaction(self.db) as conn:
            await conn.execute(
                "UPDATE geofence_events SET published = true FROM "
                "unnest(%s::text[], %s::text[]) AS done(tenant, event_id) "
                "WHERE geofence_events.tenant = done.tenant "
                "AND geofence_events.event_id = done.event_id",
                [[e.tenant for e in events], [e.event_id for e in events]],
            )

    async def erase_device(self, tenant: str, device: str) -> int:
        async with _Transaction(self.db) as conn:
            cur = await conn.execute(
                "DELETE FROM geofence_events WHERE tenant = %s AND device = %s",
                [tenant, device],
            )
            return cur.rowcount

    async def purge_before(self, cutoff_ms: int) -> int:
        async with _Transaction(self.db) as conn:
            cur = await conn.execute(
                "DELETE FROM geofence_events WHERE time_ms < %s", [cutoff_ms]
            )
            return cur.rowcount

    async def close(self) -> None:
        return None


class _Transaction:
    """``async with``: a pooled connection in a transaction; errors mapped."""

    def __init__(self, database: PostgresGeofenceDatabase) -> None:
        self.database = database

    async def __aenter__(self) -> psycopg.AsyncConnection:
        await self.database.ensure_open()
        for attempt in range(2):
            try:
                self._lease = self.database.pool.connection()
                conn = await self._lease.__aenter__()
            except psycopg.OperationalError as exc:
                raise StorageUnavailable(f"postgres: {exc}") from exc
            try:
                self._tx = conn.transaction()
                await self._tx.__aenter__()
                return conn
            except BaseException as exc:
                # Give the connection back (it stayed leased until the garbage
                # collector found the lease); the pool replaces a broken one.
                await self._lease.__aexit__(type(exc), exc, exc.__traceback__)
                if not isinstance(exc, CONNECTION_ERRORS):
                    raise
                # Nothing was written: a BEGIN that failed is safe to repeat,
                # once, on a connection made since.
                if attempt:
                    raise StorageUnavailable(f"postgres: {exc}") from exc
                await self.database.broken()
        raise AssertionError("unreachable")

    async def __aexit__(self, kind, exc, tb) -> None:
        try:
            await self._tx.__aexit__(kind, exc, tb)
        finally:
            await self._lease.__aexit__(kind, exc, tb)
        if isinstance(exc, psycopg.OperationalError):
            raise StorageUnavailable(f"postgres: {exc}") from exc


async def _locked(
    conn: psycopg.AsyncConnection, tenant: str, fence_ids: list[str]
) -> dict[str, FenceSpec]:
    cur = await conn.execute(
        "SELECT fence_id, spec FROM geofences WHERE tenant = %s "
        "AND fence_id = ANY(%s::text[]) FOR UPDATE",
        [tenant, fence_ids],
    )
    return {fid: FenceSpec.from_json(spec) for fid, spec in await cur.fetchall()}


async def _write(
    conn: psycopg.AsyncConnection, tenant: str, fences: list[FenceSpec]
) -> None:
    # Compiling thousands of shapes takes a while: off the event loop.
    rows = await asyncio.to_thread(_rows, tenant, fences)
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO geofences (tenant, fence_id, spec, labels, version, area) "
            "VALUES (%s, %s, %s, %s, %s, ST_GeomFromWKB(%s, 4326)) "
            "ON CONFLICT (tenant, fence_id) DO UPDATE SET spec = excluded.spec, "
            "labels = excluded.labels, version = excluded.version, "
            "area = excluded.area",
            rows,
        )
    await _bump(conn, tenant)


def _rows(tenant: str, fences: list[FenceSpec]) -> list[tuple]:
    return [
        (
            tenant,
            f.fence_id,
            f.to_json(),
            sorted(set(f.labels)),
            f.version,
            shapely.to_wkb(compile_shape(f.shape).area),
        )
        for f in fences
    ]


async def _bump(conn: psycopg.AsyncConnection, tenant: str) -> None:
    await conn.execute(
        "INSERT INTO geofence_revisions (tenant, revision) VALUES (%s, 1) "
        "ON CONFLICT (tenant) DO UPDATE SET "
        "revision = geofence_revisions.revision + 1",
        [tenant],
    )
