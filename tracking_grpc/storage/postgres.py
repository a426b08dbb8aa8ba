"""The production history store: PostgreSQL with PostGIS, through psycopg 3.

A batch is written in one transaction of two statements, whatever its size, sent
together in one pipeline (one round trip; the transaction commits at its end): one
that loads the rows into a temporary staging table from binary array parameters
and, from the rows loaded, upserts the devices' rows, locking each (creating new
ones), advancing its state to cover the batch and keeping the state it replaced;
and one, under a snapshot taken with every row locked, that stores the new fixes
(those past their device's state by a plain insert, the rest through ON CONFLICT DO
NOTHING), sets the state back for a device whose fixes turned out to be duplicates,
and tells the caller exactly which fixes were new (in one row when, as nearly
always, all of them were). Concurrent writers of one device queue on its row
lock, which makes the same-seq rule (not expressible as a unique key on a table
partitioned by time) safe. Each device row is written once per commit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import date, timedelta
from typing import TypeVar

import numpy as np
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import (
    InvalidArgument,
    QueryCancelled,
    QueryTimedOut,
    StorageUnavailable,
)
from tracking_grpc.storage import pgcopy, schema
from tracking_grpc.storage.base import (
    Checkpoints,
    DeviceState,
    Purged,
    RouteCheckpoint,
    StoredRoute,
    route_row,
    stored_route,
)
from tracking_grpc.storage.pgcancel import run_cancellable

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a connection the server dropped, or a pool with none to give, raises
# (psycopg_pool's PoolTimeout is an OperationalError).
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
# What a statement the server cancelled itself raises (both OperationalErrors too):
# its statement_timeout, an operator's pg_cancel_backend (57014), its lock_timeout
# (55P03). The connection is sound; the same read at once would most likely fail
# alike, so a read does not try again.
CANCELLED_BY_SERVER = (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable)

DAY_MS = 86_400_000


def utc_date(day: int) -> str:
    """A partition's day (days since 1970-01-01, UTC) as its date."""
    return (date(1970, 1, 1) + timedelta(days=day)).isoformat()


DAYS_AHEAD = 7
INT64_MAX = np.iinfo(np.int64).max
# Dropping a partition locks the whole fixes table: rather than queue every writer
# behind a long transaction, give up (the next retention pass tries again).
PURGE_LOCK_TIMEOUT = "5s"
RETRIES = 3
# How long one pool slot keeps reconnecting before it gives up; the next caller that
# finds no connection starts a fresh attempt. psycopg_pool's default (5 min) lets a
# slot's back-off double without a cap (1, 2, 4 ... 32, 64 s): after an outage of
# half a minute the pool tried again only about 30 s after PostgreSQL was back, and
# every ack waited for it (tests/test_pg_outage_recovery.py).
RECONNECT_TIMEOUT_S = 5.0
ALL_NEW = -1  # the write's answer when every staged fix was new
# The write empties its temporary tables by DELETE (see INSERT_NEW). Nothing vacuums
# a temporary table, so the space of deleted rows is not reused and the files grow
# with every write: a connection truncates them (one wait on the file system) once
# this many rows have gone through since the last time.
TRUNCATE_STAGING_AFTER_ROWS = 5_000

STAGING_COLUMNS = (
    ("idx", ">i4"),
    ("device_idx", ">i4"),
    ("seq", ">i8"),
    ("time_ms", ">i8"),
    ("lat", ">f8"),
    ("lon", ">f8"),
    ("accuracy_m", ">f4"),
    ("altitude_m", ">f4"),
    ("speed_mps", ">f4"),
    ("heading_deg", ">f4"),
    ("battery_pct", ">f4"),
    ("provider", ">i2"),
    ("received_ms", ">i8"),
)
PG_TYPES = {">i2": "smallint", ">i4": "integer", ">i8": "bigint"}
PG_TYPES |= {">f4": "real", ">f8": "double precision"}

CREATE_STAGING = "CREATE TEMP TABLE IF NOT EXISTS staging ({})".format(
    ", ".join(f"{name} {PG_TYPES[kind]} NOT NULL" for name, kind in STAGING_COLUMNS)
)
# The staging load (the first CTE of STAGE_AND_ADVANCE): one binary array parameter
# per column. psycopg prepares the write's statements after a few runs, so each
# commit costs the server no parsing or planning.
LOAD_STAGING = "INSERT INTO staging ({}) SELECT * FROM unnest({})".format(
    ", ".join(name for name, _ in STAGING_COLUMNS),
    ", ".join(f"%({name})s" for name, _ in STAGING_COLUMNS),
)

CREATE_PRIOR = """
CREATE TEMP TABLE IF NOT EXISTS prior (
    device_idx integer NOT NULL, device text NOT NULL, seq bigint, time_ms bigint,
    set_seq bigint, set_time_ms bigint, row_id tid NOT NULL
)
"""

# Locks each device's row (creating new ones) and advances its state to cover the
# whole batch, in one write per device; the state as it was under the lock (the
# locked version's, also after waiting for another writer) goes to ``prior``. The
# CTEs below follow one that yields the staged rows as STAGED_ROWS.
ADVANCE_DEVICES_AFTER = """devs AS (
    SELECT d.device, (d.i - 1)::int AS device_idx
    FROM unnest(%(devices)s::text[]) WITH ORDINALITY AS d(device, i)
), batch AS (
    SELECT device_idx, max(seq) AS seq, max(time_ms) AS time_ms
    FROM STAGED_ROWS GROUP BY device_idx
), advanced AS (
    INSERT INTO devices AS st (tenant, device, last_stored_seq, last_time_ms)
    SELECT %(tenant)s, devs.device, batch.seq, batch.time_ms
    FROM batch JOIN devs USING (device_idx)
    ORDER BY devs.device
    ON CONFLICT (tenant, device) DO UPDATE SET
        prior_seq = st.last_stored_seq,
        prior_time_ms = st.last_time_ms,
        last_stored_seq = greatest(st.last_stored_seq, excluded.last_stored_seq),
        last_time_ms = greatest(st.last_time_ms, excluded.last_time_ms),
        updated_at = now()
    RETURNING st.device, st.prior_seq, st.prior_time_ms, st.last_stored_seq,
        st.last_time_ms, st.ctid
)
-- A row created here has no prior state (the columns' NULL).
INSERT INTO prior
SELECT devs.device_idx, a.device, a.prior_seq, a.prior_time_ms,
    a.last_stored_seq, a.last_time_ms, a.ctid
FROM advanced a JOIN devs USING (device)
"""
# The write's first statement: loads the staging table and, from the rows it
# loaded, advances their devices (one statement, so one execution, not two).
STAGE_AND_ADVANCE = (
    f"WITH loaded AS (\n{LOAD_STAGING}\n    RETURNING device_idx, seq, time_ms\n), "
    + ADVANCE_DEVICES_AFTER.replace("STAGED_ROWS", "loaded")
)
# The same advance for a staging table loaded before (bench/ compares such writes).
ADVANCE_DEVICES = "WITH " + ADVANCE_DEVICES_AFTER.replace("STAGED_ROWS", "staging")

# A later statement (a snapshot taken with every row locked): stores the new fixes
# and, for the rare device some of whose fixes turned out to be duplicates, sets the
# state back to what was stored. A fix past its device's stored state in both seq
# and time repeats no stored fix (the state covers every stored fix, and no other
# writer can add one while the row is locked), and the staged fixes repeat none
# among themselves, so it goes in by a plain insert; the others check the keys with
# ON CONFLICT DO NOTHING, whose speculative insertion costs a key probe and a lock
# per row. With %(trust_state)s false every fix takes the checked way (the retry
# after a unique violation, should the state ever lag the stored fixes).
# The insert of staged rows into fixes, used twice below: the text after it names
# the rows (plain for fixes past their device's state, checked for the rest).
INSERT_FIXES_FROM = """INSERT INTO fixes (
        tenant, device, time_ms, seq, position, accuracy_m, altitude_m,
        speed_mps, heading_deg, battery_pct, provider, received_ms
    )
    SELECT %(tenant)s, device, time_ms, seq,
        ST_SetSRID(ST_MakePoint(lon, lat), 4326),
        nullif(accuracy_m, 'NaN'), nullif(altitude_m, 'NaN'),
        nullif(speed_mps, 'NaN'), nullif(heading_deg, 'NaN'),
        nullif(battery_pct, 'NaN'), provider, received_ms
    FROM"""
INSERT_NEW = """
WITH staged AS (
    SELECT s.*, p.device, p.seq AS last_stored_seq, p.time_ms AS last_time_ms,
        %(trust_state)s AND (p.seq IS NULL OR s.seq > p.seq)
            AND (p.time_ms IS NULL OR s.time_ms > p.time_ms) AS past_state
    FROM staging s
    JOIN prior p USING (device_idx)
), checked AS (
    -- A seq above the device's highest stored seq cannot repeat a stored one ...
    SELECT * FROM staged
    WHERE NOT past_state AND (last_stored_seq IS NULL OR seq > last_stored_seq)
    UNION ALL
    -- ... only the others are looked up, one index probe each (LATERAL ... LIMIT
    -- keeps the planner from hashing every stored fix of the tenant instead).
    SELECT staged.* FROM staged
    LEFT JOIN LATERAL (
        SELECT true AS stored FROM fixes f
        WHERE f.tenant = %(tenant)s AND f.device = staged.device
          AND f.seq = staged.seq
        LIMIT 1
    ) dup ON true
    WHERE staged.seq <= staged.last_stored_seq AND dup.stored IS NULL
), ins_past AS (
    INSERT_FIXES_FROM staged WHERE past_state
    ORDER BY device, time_ms
    RETURNING device, time_ms, seq
), ins_checked AS (
    INSERT_FIXES_FROM checked
    ORDER BY device, time_ms
    ON CONFLICT DO NOTHING
    RETURNING device, time_ms, seq
), ins AS (
    SELECT * FROM ins_past UNION ALL SELECT * FROM ins_checked
), outcome AS (
    -- Nearly always every staged fix is new: then nothing is set back, and the
    -- caller gets one row (-1) instead of every fix's index. Each part below is
    -- gated on this (a one-time filter: a part switched off never runs).
    SELECT (SELECT count(*) FROM ins) = (SELECT count(*) FROM staging) AS all_new
), stored AS (
    SELECT * FROM (
        SELECT p.row_id, greatest(p.seq, n.seq) AS seq,
            greatest(p.time_ms, n.time_ms) AS time_ms, p.set_seq, p.set_time_ms
        FROM prior p
        LEFT JOIN (
            SELECT device, max(seq) AS seq, max(time_ms) AS time_ms
            FROM ins GROUP BY device
        ) n USING (device)
        WHERE NOT (SELECT all_new FROM outcome)
    ) covered
    WHERE seq IS DISTINCT FROM set_seq OR time_ms IS DISTINCT FROM set_time_ms
), undone AS (
    -- By ctid (a TID scan of the few rows, not a join with every device): the row
    -- version the upsert wrote, still locked by this transaction.
    UPDATE devices st
    SET last_stored_seq = stored.seq, last_time_ms = stored.time_ms
    FROM stored
    WHERE st.ctid = ANY (ARRAY(SELECT row_id FROM stored))
      AND st.ctid = stored.row_id
), cleared_staging AS (
    -- Both temporary tables end each write empty. A DELETE, not ON COMMIT DELETE
    -- ROWS: that truncates both files at every commit, and on a disk mounted with
    -- discard a commit waited on it (DataFileTruncate) for up to 30 ms. Every CTE
    -- reads the rows as they were before this statement.
    DELETE FROM staging
), cleared_prior AS (
    DELETE FROM prior
)
SELECT ALL_NEW AS idx WHERE (SELECT all_new FROM outcome)
UNION ALL
SELECT s.idx
FROM ins
JOIN prior p USING (device)
JOIN staging s ON s.device_idx = p.device_idx AND s.time_ms = ins.time_ms
WHERE NOT (SELECT all_new FROM outcome)
"""
INSERT_NEW = INSERT_NEW.replace("ALL_NEW", str(ALL_NEW))
INSERT_NEW = INSERT_NEW.replace("INSERT_FIXES_FROM", INSERT_FIXES_FROM)

READ_COLUMNS = """seq, time_ms, ST_Y(position), ST_X(position),
    coalesce(accuracy_m, 'NaN'), coalesce(altitude_m, 'NaN'),
    coalesce(speed_mps, 'NaN'), coalesce(heading_deg, 'NaN'),
    coalesce(battery_pct, 'NaN'), provider, received_ms"""
READ_TYPES: tuple[str, ...]
READ_TYPES = (">i8", ">i8", ">f8", ">f8", ">f4", ">f4", ">f4", ">f4", ">f4")
READ_TYPES += (">i2", ">i8")

HISTORY = f"""
COPY (
    SELECT {READ_COLUMNS} FROM fixes
    WHERE tenant = {{tenant}} AND device = {{device}}
      AND time_ms >= {{start}} AND time_ms < {{end}}
    ORDER BY time_ms {{limit}}
) TO STDOUT (FORMAT BINARY)
"""

NEWEST = f"""
SELECT d.tenant, d.device, {READ_COLUMNS}
FROM devices d
JOIN fixes f ON f.tenant = d.tenant AND f.device = d.device
    AND f.time_ms = d.last_time_ms
WHERE (d.tenant, d.device) > (%(tenant)s, %(device)s)
ORDER BY d.tenant, d.device
LIMIT %(limit)s
"""

# Activity checkpoints: one upsert per flush, whatever the number of devices; a
# stored checkpoint that covers later fixes (another process's) is kept.
SAVE_CHECKPOINTS = """
INSERT INTO activity_checkpoints AS c (tenant, device, applied_ms, state)
SELECT %(tenant)s, d.device, d.applied_ms, d.state
FROM unnest(%(devices)s::text[], %(applied_ms)s::bigint[], %(states)s::bytea[])
    AS d(device, applied_ms, state)
ORDER BY d.device
ON CONFLICT (tenant, device) DO UPDATE SET
    applied_ms = excluded.applied_ms, state = excluded.state, updated_at = now()
WHERE excluded.applied_ms >= c.applied_ms
"""

ROUTE_COLUMNS = "tenant, device, route_id, assigned_ms, plan, applied_ms, state, ended"

ASSIGN_ROUTE = f"""
INSERT INTO assigned_routes ({ROUTE_COLUMNS})
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (tenant, device) DO UPDATE SET
    route_id = excluded.route_id, assigned_ms = excluded.assigned_ms,
    plan = excluded.plan, applied_ms = excluded.applied_ms,
    state = excluded.state, ended = excluded.ended, updated_at = now()
"""

# Route checkpoints: one statement per piece of a save; the device's route must still
# be the same assignment, and a stored state covering later fixes (another
# process's) stays. The rows are locked in (tenant, device) order whatever the join's
# plan, so that two processes saving overlapping routes wait rather than deadlock.
SAVE_ROUTE_CHECKPOINTS = """
UPDATE assigned_routes AS r SET
    applied_ms = c.applied_ms, state = c.state, ended = r.ended OR c.ended,
    updated_at = now()
FROM (
    SELECT c.* FROM unnest(%(tenants)s::text[], %(devices)s::text[],
        %(route_ids)s::text[], %(assigned_ms)s::bigint[], %(applied_ms)s::bigint[],
        %(states)s::bytea[], %(ended)s::boolean[])
        AS c(tenant, device, route_id, assigned_ms, applied_ms, state, ended)
    JOIN assigned_routes AS l ON l.tenant = c.tenant AND l.device = c.device
    ORDER BY c.tenant, c.device
    FOR UPDATE OF l
) AS c
WHERE r.tenant = c.tenant AND r.device = c.device AND r.route_id = c.route_id
    AND r.assigned_ms = c.assigned_ms AND r.applied_ms <= c.applied_ms
"""

# A page of the routes loaded at start: keyset on the primary key (an index range
# scan from the last page's key; LIMIT NULL is no limit).
MONITORED_ROUTES = f"""
SELECT {ROUTE_COLUMNS} FROM assigned_routes
WHERE NOT ended AND (tenant, device) > (%(tenant)s, %(device)s)
ORDER BY tenant, device
LIMIT %(limit)s
"""

# A restore's fixes: each device's from its own time on, one primary-key range
# scan per device (the lowest bound keeps the scans to the partitions needed), in
# binary like HISTORY, each row with its device's position in the list (from 1).
FIXES_SINCE = f"""
COPY (
    SELECT {READ_COLUMNS}, c.i::integer
    FROM unnest({{devices}}::text[], {{since}}::bigint[]) WITH ORDINALITY
        AS c(device, since_ms, i)
    JOIN fixes f ON f.tenant = {{tenant}} AND f.device = c.device
        AND f.time_ms >= c.since_ms AND f.time_ms >= {{first}}
    ORDER BY c.i, f.time_ms
) TO STDOUT (FORMAT BINARY)
"""

# A take-over's fixes: each device's newest ``limit`` in its own time range, one
# backward primary-key range scan per device (the outer bounds keep the scans to
# the partitions needed), in binary like FIXES_SINCE. Newest first, ``older``
# counts the fixes received before ``recent``: of those only the first is kept.
FIXES_BEFORE = f"""
COPY (
    SELECT {READ_COLUMNS}, c.i::integer
    FROM unnest({{devices}}::text[], {{starts}}::bigint[], {{ends}}::bigint[])
        WITH ORDINALITY AS c(device, start_ms, end_ms, i)
    CROSS JOIN LATERAL (
        SELECT * FROM (
            SELECT n.*, count(*) FILTER (WHERE n.received_ms < {{recent}})
                OVER (ORDER BY n.time_ms DESC ROWS UNBOUNDED PRECEDING) AS older
            FROM (
                SELECT * FROM fixes f
                WHERE f.tenant = {{tenant}} AND f.device = c.device
                    AND f.time_ms >= c.start_ms AND f.time_ms < c.end_ms
                    AND f.time_ms >= {{first}} AND f.time_ms < {{last}}
                ORDER BY f.time_ms DESC
                LIMIT {{limit}}
            ) AS n
        ) AS n
        WHERE n.older = 0 OR (n.older = 1 AND n.received_ms < {{recent}})
    ) AS f
    ORDER BY c.i, f.time_ms
) TO STDOUT (FORMAT BINARY)
"""

# The retry's check (``stored_as_received``): each fix of the batch against the
# stored fix of its device at its fix time, one primary-key probe each (LATERAL ...
# LIMIT keeps the planner from hashing every stored fix of the batch's time span
# instead); the bounds on time_ms keep the probes to the batch's days' partitions.
STORED_AS_RECEIVED = """
SELECT c.idx
FROM unnest(%(idx)s, %(devices)s::text[], %(time_ms)s, %(seq)s, %(received_ms)s)
    AS c(idx, device, time_ms, seq, received_ms)
JOIN LATERAL (
    SELECT f.seq, f.received_ms FROM fixes f
    WHERE f.tenant = %(tenant)s AND f.device = c.device AND f.time_ms = c.time_ms
      AND f.time_ms >= %(first_ms)s AND f.time_ms <= %(last_ms)s
    LIMIT 1
) f ON f.seq = c.seq AND f.received_ms = c.received_ms
"""


class PostgresHistoryStore:
    """HistoryStore on PostgreSQL/PostGIS; see the module docstring for the write."""

    # Commits may overlap: device rows are locked in each transaction and duplicates
    # resolve through the unique keys, so the pipeline runs several at once.
    concurrent_writers = True

    def __init__(
        self,
        url: str,
        *,
        min_connections: int = 1,
        max_connections: int = 8,
        pool_timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self._timeout_s = pool_timeout_s
        self._pool = AsyncConnectionPool(
            url,
            min_size=min_connections,
            max_size=max_connections,
            timeout=pool_timeout_s,
            kwargs={"autocommit": True},
            configure=functools.partial(_configure, lock_timeout_s=pool_timeout_s),
            open=False,
            name="history",
            reconnect_timeout=RECONNECT_TIMEOUT_S,
        )
        # Rows through each connection's staging table since it was last truncated.
        self._staged_rows: weakref.WeakKeyDictionary[psycopg.AsyncConnection, int]
        self._staged_rows = weakref.WeakKeyDictionary()
        self._partition_days: set[int] = set()
        self._prepared_day = -1
        self._partition_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        min_connections: int = 1,
        max_connections: int = 8,
        pool_timeout_s: float = 5.0,
    ) -> PostgresHistoryStore:
        """Connect, check the schema is migrated, and create the coming partitions."""
        store = cls(
            url,
            min_connections=min_connections,
            max_connections=max_connections,
            pool_timeout_s=pool_timeout_s,
        )
        try:
            async with await psycopg.AsyncConnection.connect(url) as conn:
                await schema.check(conn)
            await store._pool.open(wait=True, timeout=pool_timeout_s)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            await store._pool.close()
            raise StorageUnavailable(f"PostgreSQL unreachable: {exc}") from exc
        await store.prepare_partitions(int(time.time() * 1000))
        return store

    async def prepare_partitions(self, now_ms: int) -> None:
        """Make the partitions of yesterday to a week ahead exist (ahead of need)."""
        today = now_ms // DAY_MS
        await self._ensure_days(np.arange(today - 1, today + DAYS_AHEAD + 1))
        self._prepared_day = today

    async def store(self, batch: FixBatch) -> np.ndarray:
        new = np.zeros(len(batch), dtype=bool)
        if len(batch) == 0:
            return new
        if int(batch.seq.max()) > INT64_MAX:
            raise InvalidArgument("seq", "must be below 2^63")
        candidates = _first_occurrences(batch)
        devices, device_idx = np.unique(batch.device.astype(str), return_inverse=True)
        now_ms = int(time.time() * 1000)
        if now_ms // DAY_MS != self._prepared_day:  # a new day: the next week's too
            await self.prepare_partitions(now_ms)
        await self._ensure_days(np.unique(batch.time_ms[candidates] // DAY_MS))
        staged = _staging_columns(batch, candidates, device_idx)
        params: dict[str, str | bool] = {
            "tenant": batch.tenant,
            "devices": text_array(devices.tolist()),
            "trust_state": True,
        }
        for attempt in range(RETRIES):
            try:
                async with self._pool.connection() as conn:
                    rows = await self._write(conn, staged, params)
                break
            except psycopg.errors.UniqueViolation as exc:
                if not params["trust_state"]:
                    raise
                # A fix past its device's state met a stored one: the state lags
                # what is stored (edited by hand, restored apart). Nothing was
                # written; every fix now checks the keys.
                log.warning("device state behind stored fixes; checking all: %s", exc)
                params["trust_state"] = False
            except psycopg.errors.TransactionRollback as exc:
                if attempt == RETRIES - 1:
                    raise StorageUnavailable(
                        f"PostgreSQL kept rolling back: {exc}"
                    ) from exc
                log.info("store of %d fixes rolled back; retrying", len(batch))
            except CONNECTION_ERRORS as exc:
                await self._check_pool()
                raise StorageUnavailable(f"PostgreSQL cannot store: {exc}") from exc
        if rows == [(ALL_NEW,)]:
            new[candidates] = True
            return new
        new[np.fromiter((r[0] for r in rows), dtype=np.intp, count=len(rows))] = True
        return new

    async def _write(
        self,
        conn: psycopg.AsyncConnection,
        staged: list[tuple[np.ndarray, str]],
        params: dict[str, str | bool],
    ) -> list[tuple]:
        """The write's two statements in one pipeline; the new rows' ``idx``.

        Autocommit and no Sync in between: they are one implicit transaction,
        committed at the pipeline's end (before it returns), each statement under
        a snapshot of its own.
        """
        arrays = {
            name: pgcopy.BinaryArray.of(values, kind)
            for (name, _), (values, kind) in zip(STAGING_COLUMNS, staged, strict=True)
        }
        staged_rows = self._staged_rows.get(conn, 0) + len(staged[0][0])
        async with conn.pipeline():
            if staged_rows > TRUNCATE_STAGING_AFTER_ROWS:
                await conn.execute("TRUNCATE staging, prior")
                staged_rows = len(staged[0][0])
            await conn.execute(STAGE_AND_ADVANCE, {**arrays, **params})
            cur = await conn.execute(INSERT_NEW, params)
        rows = await cur.fetchall()
        self._staged_rows[conn] = staged_rows
        return rows

    async def stored_as_received(self, batch: FixBatch) -> np.ndarray:
        found = np.zeros(len(batch), dtype=bool)
        if len(batch) == 0:
            return found
        rows = await self._fetch(STORED_AS_RECEIVED, _receipt_params(batch))
        found[[idx for (idx,) in rows]] = True
        return found

    async def device_states(
        self, tenant: str, devices: Sequence[str]
    ) -> dict[str, DeviceState]:
        rows = await self._fetch(
            "SELECT device, last_stored_seq, last_time_ms FROM devices "
            "WHERE tenant = %s AND device = ANY(%s) AND last_time_ms IS NOT NULL",
            [tenant, list(devices)],
        )
        return {d: DeviceState(d, int(seq), int(t)) for d, seq, t in rows}

    async def history(
        self,
        tenant: str,
        device: str,
        start_ms: int,
        end_ms: int,
        limit: int | None = None,
    ) -> FixBatch:
        query = sql.SQL(HISTORY).format(
            tenant=sql.Literal(tenant),
            device=sql.Literal(device),
            start=sql.Literal(int(start_ms)),
            end=sql.Literal(int(end_ms)),
            limit=sql.SQL(f"LIMIT {int(limit)}" if limit else ""),
        )

        async def copy_out(conn: psycopg.AsyncConnection) -> bytes:
            async with conn.cursor().copy(query) as copy:
                return b"".join([bytes(chunk) async for chunk in copy])

        data = await self._read(copy_out, "cannot read")
        rows = pgcopy.decode_rows(data, READ_TYPES)
        return _batch_from_rows(tenant, np.full(len(rows), device, dtype=object), rows)

    async def count(self, tenant: str, device: str | None = None) -> int:
        if device is None:
            rows = await self._fetch(
                "SELECT count(*) FROM fixes WHERE tenant = %s", [tenant]
            )
        else:
            rows = await self._fetch(
                "SELECT count(*) FROM fixes WHERE tenant = %s AND device = %s",
                [tenant, device],
            )
        return int(rows[0][0])

    async def newest_positions(self) -> AsyncIterator[FixBatch]:
        after = {"tenant": "", "device": "", "limit": 5000}
        while True:
            rows = await self._fetch(NEWEST, after)
            if not rows:
                return
            tenants = np.array([r[0] for r in rows], dtype=object)
            starts = np.flatnonzero(np.r_[True, tenants[1:] != tenants[:-1]])
            for start, end in zip(starts, np.r_[starts[1:], len(rows)], strict=True):
                yield _batch_from_tuples(tenants[start], rows[start:end])
            after |= {"tenant": rows[-1][0], "device": rows[-1][1]}

    async def erase_device(self, tenant: str, device: str) -> int:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM devices WHERE tenant = %s AND device = %s "
                    "FOR UPDATE",
                    [tenant, device],
                )
                cur = await conn.execute(
                    "DELETE FROM fixes WHERE tenant = %s AND device = %s",
                    [tenant, device],
                )
                deleted = cur.rowcount
                for table in ("devices", "activity_checkpoints", "assigned_routes"):
                    await conn.execute(
                        sql.SQL(
                            "DELETE FROM {} WHERE tenant = %s AND device = %s"
                        ).format(sql.Identifier(table)),
                        [tenant, device],
                    )
        except CONNECTION_ERRORS as exc:
            raise StorageUnavailable(f"PostgreSQL cannot erase: {exc}") from exc
        return deleted

    async def purge_before(self, cutoff_ms: int) -> Purged:
        """Drop the day partitions wholly before ``cutoff_ms``; delete the older
        rows left (in the default partition, and of the cutoff's own day when it
        is not midnight UTC), then the state of devices with no newer fix and the
        routes that arrived before the cutoff."""
        try:
            async with self._pool.connection() as conn:
                async with conn.transaction():
                    await conn.execute(
                        f"SET LOCAL lock_timeout = '{PURGE_LOCK_TIMEOUT}'"
                    )
                    cur = await conn.execute(
                        "SELECT tracking_drop_partitions_before(%s)",
                        [cutoff_ms // DAY_MS],
                    )
                    dropped = [int(day) for (day,) in await cur.fetchall()]
                self._partition_days.difference_update(dropped)
                cur = await conn.execute(
                    "DELETE FROM fixes WHERE time_ms < %s", [cutoff_ms]
                )
                deleted = cur.rowcount
                cur = await conn.execute(
                    "DELETE FROM devices WHERE last_time_ms < %s "
                    "RETURNING tenant, device",
                    [cutoff_ms],
                )
                gone = [(tenant, device) for tenant, device in await cur.fetchall()]
                await conn.execute(
                    "DELETE FROM activity_checkpoints WHERE applied_ms < %s",
                    [cutoff_ms],
                )
                cur = await conn.execute(
                    "DELETE FROM assigned_routes WHERE ended AND applied_ms < %s",
                    [cutoff_ms],
                )
                routes = cur.rowcount
        except (*CONNECTION_ERRORS, psycopg.errors.LockNotAvailable) as exc:
            raise StorageUnavailable(f"PostgreSQL cannot purge: {exc}") from exc
        for day in dropped:
            log.info("dropped the fixes partition of %s (retention)", utc_date(day))
        return Purged(deleted, len(dropped), gone, routes)

    async def save_checkpoints(self, checkpoints: Checkpoints) -> None:
        if not checkpoints.devices:
            return
        params = {
            "tenant": checkpoints.tenant,
            "devices": text_array(checkpoints.devices),
            "applied_ms": checkpoints.applied_ms.astype(np.int64).tolist(),
            "states": checkpoints.states,
        }
        try:
            async with self._pool.connection() as conn:
                await conn.execute(SAVE_CHECKPOINTS, params)
        except CONNECTION_ERRORS as exc:
            await self._check_pool()
            raise StorageUnavailable(f"PostgreSQL cannot checkpoint: {exc}") from exc

    async def load_checkpoints(
        self, tenant: str, devices: Sequence[str]
    ) -> Checkpoints:
        rows = await self._fetch(
            "SELECT device, applied_ms, state FROM activity_checkpoints "
            "WHERE tenant = %s AND device = ANY(%s::text[])",
            [tenant, text_array(list(devices))],
        )
        return Checkpoints(
            tenant,
            [r[0] for r in rows],
            np.array([r[1] for r in rows], dtype=np.int64),
            [bytes(r[2]) for r in rows],
        )

    async def erase_checkpoint(self, tenant: str, device: str) -> None:
        try:
            async with self._pool.connection() as conn:
                await conn.execute(
                    "DELETE FROM activity_checkpoints "
                    "WHERE tenant = %s AND device = %s",
                    [tenant, device],
                )
        except CONNECTION_ERRORS as exc:
            raise StorageUnavailable(f"PostgreSQL cannot erase: {exc}") from exc

    async def assign_route(self, route: StoredRoute) -> None:
        await self._write_routes(ASSIGN_ROUTE, route_row(route), "cannot assign")

    async def save_route_checkpoints(
        self, checkpoints: Sequence[RouteCheckpoint]
    ) -> None:
        if not checkpoints:
            return
        checkpoints = sorted(checkpoints, key=lambda c: (c.tenant, c.device))
        params = {
            "tenants": text_array([c.tenant for c in checkpoints]),
            "devices": text_array([c.device for c in checkpoints]),
            "route_ids": text_array([c.route_id for c in checkpoints]),
            "assigned_ms": [c.assigned_ms for c in checkpoints],
            "applied_ms": [c.applied_ms for c in checkpoints],
            "states": [c.state for c in checkpoints],
            "ended": [c.ended for c in checkpoints],
        }
        await self._write_routes(SAVE_ROUTE_CHECKPOINTS, params, "cannot checkpoint")

    async def clear_route(self, tenant: str, device: str) -> bool:
        statement = "DELETE FROM assigned_routes WHERE tenant = %s AND device = %s"
        deleted = await self._write_routes(statement, [tenant, device], "cannot clear")
        return deleted > 0

    async def _write_routes(
        self,
        statement: str,
        params: Sequence[object] | Mapping[str, object],
        failed: str,
    ) -> int:
        """One statement on assigned_routes; the number of rows it changed."""
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(statement, params)
                return cur.rowcount
        except CONNECTION_ERRORS as exc:
            await self._check_pool()
            raise StorageUnavailable(f"PostgreSQL {failed}: {exc}") from exc

    async def routes(self, tenant: str, devices: Sequence[str]) -> list[StoredRoute]:
        rows = await self._fetch(
            f"SELECT {ROUTE_COLUMNS} FROM assigned_routes "
            "WHERE tenant = %s AND device = ANY(%s::text[])",
            [tenant, text_array(list(devices))],
        )
        return [stored_route(row) for row in rows]

    async def monitored_routes(
        self, after: tuple[str, str] | None = None, limit: int | None = None
    ) -> list[StoredRoute]:
        tenant, device = after if after is not None else ("", "")
        rows = await self._fetch(
            MONITORED_ROUTES, {"tenant": tenant, "device": device, "limit": limit}
        )
        return [stored_route(row) for row in rows]

    async def fixes_since(self, tenant: str, since_ms: Mapping[str, int]) -> FixBatch:
        if not since_ms:
            return FixBatch.empty(tenant)
        devices = sorted(since_ms)
        starts = [int(since_ms[d]) for d in devices]
        query = sql.SQL(FIXES_SINCE).format(
            tenant=sql.Literal(tenant),
            devices=sql.Literal(text_array(devices)),
            since=sql.Literal("{" + ",".join(map(str, starts)) + "}"),
            first=sql.Literal(min(starts)),
        )
        return await self._copy_fixes(tenant, devices, query)

    async def _copy_fixes(
        self, tenant: str, devices: list[str], query: sql.Composed
    ) -> FixBatch:
        """The fixes a COPY of READ_COLUMNS and each row's device (its position
        in ``devices``, from 1) gives."""

        async def copy_out(conn: psycopg.AsyncConnection) -> bytes:
            async with conn.cursor().copy(query) as copy:
                return b"".join([bytes(chunk) async for chunk in copy])

        data = await self._read(copy_out, "cannot read")
        rows = pgcopy.decode_rows(data, (*READ_TYPES, ">i4"))
        names = np.array(devices, dtype=object)[rows[f"f{len(READ_TYPES)}"] - 1]
        return _batch_from_rows(tenant, names, rows)

    async def fixes_before(
        self,
        tenant: str,
        bounds: Mapping[str, tuple[int, int]],
        limit: int,
        recent_ms: int | None = None,
    ) -> FixBatch:
        if not bounds or limit <= 0:
            return FixBatch.empty(tenant)
        devices = sorted(bounds)
        starts = [int(bounds[d][0]) for d in devices]
        ends = [int(bounds[d][1]) for d in devices]
        query = sql.SQL(FIXES_BEFORE).format(
            tenant=sql.Literal(tenant),
            devices=sql.Literal(text_array(devices)),
            starts=sql.Literal("{" + ",".join(map(str, starts)) + "}"),
            ends=sql.Literal("{" + ",".join(map(str, ends)) + "}"),
            first=sql.Literal(min(starts)),
            last=sql.Literal(max(ends)),
            limit=sql.Literal(int(limit)),
            recent=sql.Literal(-(2**63) if recent_ms is None else int(recent_ms)),
        )
        return await self._copy_fixes(tenant, devices, query)

    async def ping(self) -> None:
        """Raise StorageUnavailable unless PostgreSQL answers a query now."""
        await self._fetch("SELECT 1", [])

    async def close(self) -> None:
        await self._pool.close()

    async def _fetch(
        self, query: str, params: Sequence[object] | Mapping[str, object]
    ) -> list[tuple]:
        """Rows of a statement that is safe to repeat: a read, or the idempotent
        partition functions."""

        async def fetch(conn: psycopg.AsyncConnection) -> list[tuple]:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

        return await self._read(fetch, "unavailable")

    async def _read(
        self, run: Callable[[psycopg.AsyncConnection], Awaitable[T]], failed: str
    ) -> T:
        """``run`` on a pooled connection; after a broken one, once more on a fresh
        one (a server that dropped its sessions is usually up again at once). A
        statement PostgreSQL cancelled is not run again. A caller cancelled gives
        the statement's cancellation the pool timeout, then drops the connection
        (see :mod:`.pgcancel`)."""
        for attempt in range(2):
            try:
                async with self._pool.connection() as conn:
                    return await run_cancellable(run(conn), conn, self._timeout_s)
            except CANCELLED_BY_SERVER as exc:
                raise cancelled_read(exc) from exc
            except CONNECTION_ERRORS as exc:
                await self._check_pool()
                if attempt or isinstance(exc, PoolTimeout):
                    raise StorageUnavailable(f"PostgreSQL {failed}: {exc}") from exc
        raise AssertionError("unreachable")

    async def _check_pool(self) -> None:
        """After a failure, replace the pool's broken connections (a restarted
        server breaks them all). Connections are not checked on every checkout:
        that was a round trip per commit."""
        try:
            await self._pool.check()
        except Exception:  # the caller reports the failure that brought it here
            log.debug("checking the pool's connections failed", exc_info=True)

    async def _ensure_days(self, days: np.ndarray) -> None:
        missing = [int(d) for d in days if int(d) not in self._partition_days]
        if not missing:
            return
        async with self._partition_lock:
            rows = await self._fetch("SELECT tracking_partition_days()", [])
            self._partition_days = {int(r[0]) for r in rows}
            for day in missing:
                if day in self._partition_days:
                    continue
                made = await self._fetch("SELECT tracking_ensure_partition(%s)", [day])
                if made[0][0]:
                    log.info("created the fixes partition of %s", utc_date(day))
                    self._partition_days.add(day)


def cancelled_read(exc: psycopg.Error) -> QueryCancelled:
    """The error of a read that PostgreSQL cancelled (``CANCELLED_BY_SERVER``):
    timed out when its statement_timeout did it, cancelled otherwise. PostgreSQL
    gives the cause only in its message (in English unless ``lc_messages`` says
    otherwise; a translated one makes a timeout a plain cancellation)."""
    reason = exc.diag.message_primary or str(exc)
    timed_out = isinstance(exc, psycopg.errors.QueryCanceled) and (
        "statement timeout" in reason
    )
    log.info("PostgreSQL cancelled a read; not retried: %s", reason)
    kind = QueryTimedOut if timed_out else QueryCancelled
    return kind(f"the database cancelled the query: {reason}")


async def set_lock_timeout(
    conn: psycopg.AsyncConnection, lock_timeout_s: float
) -> None:
    """Make a statement waiting on a lock (LOCK TABLE, a long ALTER TABLE, a stuck
    migration) give up after ``lock_timeout_s``, as a wait for a pooled connection
    does: the write is retried and the outage logged, where it used to hold every
    ack with nothing said. A SET, not a connection option: it would replace the
    options a database URL carries."""
    await conn.execute(f"SET lock_timeout = {max(1, round(lock_timeout_s * 1000))}")
    if not conn.autocommit:
        await conn.commit()  # a pool takes back only an idle connection


async def _configure(conn: psycopg.AsyncConnection, lock_timeout_s: float) -> None:
    # The planner prices the write (a probe per staged row into every partition) far
    # above jit_above_cost, and compiling it took ~0.75 s of a 5,000-fix commit that
    # runs in ~0.1 s without: these statements gain nothing from JIT.
    await conn.execute("SET jit = off")
    await set_lock_timeout(conn, lock_timeout_s)
    conn.adapters.register_dumper(pgcopy.BinaryArray, pgcopy.BinaryArrayDumper)
    await conn.execute(CREATE_STAGING)
    await conn.execute(CREATE_PRIOR)


def text_array(values: list[str]) -> str:
    """A PostgreSQL array literal of text values, built with a few string-wide
    operations instead of one dump per element: every element double-quoted, with
    backslash and double quote escaped (NUL, the join mark, cannot be in text)."""
    if not values:
        return "{}"
    joined = "\x00".join(values).replace("\\", "\\\\").replace('"', '\\"')
    return '{"' + joined.replace("\x00", '","') + '"}'


def _first_occurrences(batch: FixBatch) -> np.ndarray:
    """Index of rows not repeating an earlier row's (device, time) or (device, seq)."""
    devices = batch.device.astype(str)
    keep = np.ones(len(batch), dtype=bool)
    for key in (batch.time_ms, batch.seq):
        order = np.lexsort((np.arange(len(batch)), key, devices))
        repeat = np.zeros(len(batch), dtype=bool)
        same = (devices[order][1:] == devices[order][:-1]) & (
            key[order][1:] == key[order][:-1]
        )
        repeat[order[1:][same]] = True
        keep &= ~repeat
    return np.flatnonzero(keep)


def _staging_columns(
    batch: FixBatch, rows: np.ndarray, device_idx: np.ndarray
) -> list[tuple[np.ndarray, str]]:
    """The staging table's columns for the given rows, with their binary types."""
    values = {
        "idx": rows,
        "device_idx": device_idx[rows],
        "seq": batch.seq[rows].astype(np.int64),
    }
    for name, _ in STAGING_COLUMNS[3:]:
        values[name] = getattr(batch, name)[rows]
    return [(values[name], kind) for name, kind in STAGING_COLUMNS]


def _receipt_params(batch: FixBatch) -> dict[str, object]:
    """STORED_AS_RECEIVED's parameters: what identifies each fix of the batch as
    received."""
    columns = (
        ("idx", np.arange(len(batch)), ">i4"),
        ("time_ms", batch.time_ms, ">i8"),
        ("seq", batch.seq.astype(np.int64), ">i8"),
        ("received_ms", batch.received_ms, ">i8"),
    )
    params: dict[str, object] = {
        name: pgcopy.BinaryArray.of(values, kind) for name, values, kind in columns
    }
    return params | {
        "tenant": batch.tenant,
        "devices": text_array(batch.device.astype(str).tolist()),
        "first_ms": int(batch.time_ms.min()),
        "last_ms": int(batch.time_ms.max()),
    }


def _batch_from_rows(tenant: str, devices: np.ndarray, rows: np.ndarray) -> FixBatch:
    f = [rows[f"f{i}"] for i in range(len(READ_TYPES))]
    return FixBatch(
        tenant=tenant,
        device=devices,
        seq=f[0].astype(np.uint64),
        time_ms=f[1].astype(np.int64),
        lat=f[2].astype(np.float64),
        lon=f[3].astype(np.float64),
        accuracy_m=f[4].astype(np.float32),
        altitude_m=f[5].astype(np.float32),
        speed_mps=f[6].astype(np.float32),
        heading_deg=f[7].astype(np.float32),
        battery_pct=f[8].astype(np.float32),
        provider=f[9].astype(np.int32),
        received_ms=f[10].astype(np.int64),
    )


def _batch_from_tuples(tenant: str, rows: list[tuple]) -> FixBatch:
    devices = np.array([r[1] for r in rows], dtype=object)
    columns = list(zip(*(r[2:] for r in rows), strict=True))
    table = np.empty(len(rows), dtype=pgcopy.row_dtype(READ_TYPES))
    for i, column in enumerate(columns):
        table[f"f{i}"] = np.asarray(column, dtype=float if i in (2, 3) else None)
    return _batch_from_rows(tenant, devices, table)
