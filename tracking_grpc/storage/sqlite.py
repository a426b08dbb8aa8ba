"""Embedded history store: SQLite in WAL mode, one writer thread, one reader thread.

Fixes are keyed by (tenant, device, time_ms) with a second unique key on
(tenant, device, seq), so a resend under either identity is ignored. Device state is
updated in the same transaction as the fixes it summarises.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tracking_grpc.core.fixes import OPTIONAL_COLUMNS, FixBatch
from tracking_grpc.errors import StorageUnavailable
from tracking_grpc.storage.base import (
    Checkpoints,
    DeviceState,
    Purged,
    RouteCheckpoint,
    StoredRoute,
    route_row,
    stored_route,
)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS fixes (
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    lat REAL NOT NULL,
    lon REAL NOT NULL,
    accuracy_m REAL,
    altitude_m REAL,
    speed_mps REAL,
    heading_deg REAL,
    battery_pct REAL,
    provider INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, device, time_ms)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS fixes_by_seq ON fixes (tenant, device, seq);
CREATE TABLE IF NOT EXISTS devices (
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    lat REAL NOT NULL,
    lon REAL NOT NULL,
    accuracy_m REAL,
    altitude_m REAL,
    speed_mps REAL,
    heading_deg REAL,
    battery_pct REAL,
    provider INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS activity_checkpoints (
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    applied_ms INTEGER NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (tenant, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS assigned_routes (
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    route_id TEXT NOT NULL,
    assigned_ms INTEGER NOT NULL,
    plan BLOB NOT NULL,
    applied_ms INTEGER NOT NULL,
    state BLOB NOT NULL,
    ended INTEGER NOT NULL,
    PRIMARY KEY (tenant, device)
) WITHOUT ROWID;
"""

COLUMNS = (
    "device",
    "time_ms",
    "seq",
    "lat",
    "lon",
    *OPTIONAL_COLUMNS,
    "provider",
    "received_ms",
)

INSERT_FIX = f"""
INSERT OR IGNORE INTO fixes (tenant, {", ".join(COLUMNS)})
VALUES ({", ".join("?" * (len(COLUMNS) + 1))})
"""

UPSERT_DEVICE = f"""
INSERT INTO devices (tenant, last_seq, {", ".join(COLUMNS)})
VALUES ({", ".join("?" * (len(COLUMNS) + 2))})
ON CONFLICT (tenant, device) DO UPDATE SET
    last_seq = max(devices.last_seq, excluded.last_seq),
    {
    ", ".join(
        f"{c} = CASE WHEN excluded.time_ms > devices.time_ms THEN excluded.{c} "
        f"ELSE devices.{c} END"
        for c in COLUMNS[1:]
    )
}
"""

UPSERT_CHECKPOINT = """
INSERT INTO activity_checkpoints (tenant, device, applied_ms, state)
VALUES (?, ?, ?, ?)
ON CONFLICT (tenant, device) DO UPDATE SET
    applied_ms = excluded.applied_ms, state = excluded.state
WHERE excluded.applied_ms >= activity_checkpoints.applied_ms
"""

ASSIGN_ROUTE = """
INSERT OR REPLACE INTO assigned_routes
    (tenant, device, route_id, assigned_ms, plan, applied_ms, state, ended)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""

SAVE_ROUTE_CHECKPOINT = """
UPDATE assigned_routes
SET applied_ms = :applied_ms, state = :state, ended = max(ended, :ended)
WHERE tenant = :tenant AND device = :device AND route_id = :route_id
    AND assigned_ms = :assigned_ms AND applied_ms <= :applied_ms
"""

ROUTE_COLUMNS = "tenant, device, route_id, assigned_ms, plan, applied_ms, state, ended"

# A page of the routes loaded at start: keyset on the primary key (LIMIT -1 is no
# limit).
MONITORED_ROUTES = f"""
SELECT {ROUTE_COLUMNS} FROM assigned_routes
WHERE ended = 0 AND (tenant, device) > (?, ?)
ORDER BY tenant, device
LIMIT ?
"""

# The retry's check (``stored_as_received``): one primary-key probe per fix.
STORED_AS_RECEIVED = """
SELECT 1 FROM fixes
WHERE tenant = ? AND device = ? AND time_ms = ? AND seq = ? AND received_ms = ?
"""


def _rows(batch: FixBatch) -> list[tuple]:
    """Rows for executemany; NaN becomes NULL."""
    columns: list[list] = []
    for name in COLUMNS:
        values = getattr(batch, name)
        if values.dtype.kind == "f":
            columns.append(
                [None if v != v else v for v in values.astype(np.float64).tolist()]
            )
        else:
            columns.append(values.tolist())
    return list(zip([batch.tenant] * len(batch), *columns, strict=True))


def _batch(tenant: str, rows: list[tuple]) -> FixBatch:
    """A FixBatch from rows in COLUMNS order; NULL becomes NaN."""
    if not rows:
        return FixBatch.empty(tenant)
    cols = list(zip(*rows, strict=True))
    named = dict(zip(COLUMNS, cols, strict=True))
    optional = {
        name: np.array(
            [np.nan if v is None else v for v in named[name]], dtype=np.float32
        )
        for name in OPTIONAL_COLUMNS
    }
    return FixBatch.from_columns(
        tenant,
        named["device"],
        named["seq"],
        named["time_ms"],
        named["lat"],
        named["lon"],
        provider=named["provider"],
        received_ms=np.asarray(named["received_ms"], dtype=np.int64),
        **optional,
    )


class SqliteHistoryStore:
    """HistoryStore on one SQLite file."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self._synchronous = synchronous
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path, synchronous: str = "FULL") -> SqliteHistoryStore:
        store = cls(path, synchronous)
        await store._run(store._writer, store._open_writer)
        await store._run(store._reader, store._open_reader)
        return store

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _open_writer(self) -> None:
        if self._synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"sqlite_synchronous {self._synchronous!r} is not valid")
        conn = self._connect()
        conn.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
        conn.executescript(SCHEMA)
        self._wconn = conn

    def _open_reader(self) -> None:
        self._rconn = self._connect()

    async def _run(self, pool: ThreadPoolExecutor, fn, *args):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, fn, *args)
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"sqlite: {exc}") from exc

    async def store(self, batch: FixBatch) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros(0, dtype=bool)
        return await self._run(self._writer, self._store, batch)

    def _store(self, batch: FixBatch) -> np.ndarray:
        conn = self._wconn
        assert conn is not None
        new = np.zeros(len(batch), dtype=bool)
        rows = _rows(batch)
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = conn.total_changes
            for i, row in enumerate(rows):
                conn.execute(INSERT_FIX, row)
                if conn.total_changes != before:
                    new[i] = True
                    before = conn.total_changes
            if new.any():
                stored = batch.take(new)
                newest = stored.take(stored.newest_per_device())
                last_seq = {
                    d: int(s)
                    for d, s in _max_seq_per_device(stored.device, stored.seq).items()
                }
                conn.executemany(
                    UPSERT_DEVICE,
                    [(row[0], last_seq[row[1]], *row[1:]) for row in _rows(newest)],
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return new

    async def stored_as_received(self, batch: FixBatch) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros(0, dtype=bool)
        return await self._run(self._reader, self._stored_as_received, batch)

    def _stored_as_received(self, batch: FixBatch) -> np.ndarray:
        assert self._rconn is not None
        keys = zip(
            batch.device.astype(str).tolist(),
            batch.time_ms.tolist(),
            batch.seq.tolist(),
            batch.received_ms.tolist(),
            strict=True,
        )
        found = [
            self._rconn.execute(STORED_AS_RECEIVED, (batch.tenant, *key)).fetchone()
            for key in keys
        ]
        return np.array([row is not None for row in found], dtype=bool)

    async def device_states(
        self, tenant: str, devices: Sequence[str]
    ) -> dict[str, DeviceState]:
        return await self._run(self._reader, self._device_states, tenant, list(devices))

    def _device_states(self, tenant: str, devices: list[str]) -> dict[str, DeviceState]:
        assert self._rconn is not None
        found: dict[str, DeviceState] = {}
        for start in range(0, len(devices), 500):
            chunk = devices[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._rconn.execute(
                "SELECT device, last_seq, time_ms FROM devices "
                f"WHERE tenant = ? AND device IN ({marks})",
                [tenant, *chunk],
            ).fetchall()
            for device, last_seq, time_ms in rows:
                found[device] = DeviceState(device, int(last_seq), int(time_ms))
        return found

    async def history(
        self,
        tenant: str,
        device: str,
        start_ms: int,
        end_ms: int,
        limit: int | None = None,
    ) -> FixBatch:
        return await self._run(
            self._reader, self._history, tenant, device, start_ms, end_ms, limit
        )

    def _history(
        self, tenant: str, device: str, start_ms: int, end_ms: int, limit: int | None
    ) -> FixBatch:
        assert self._rconn is not None
        rows = self._rconn.execute(
            f"SELECT {', '.join(COLUMNS)} FROM fixes WHERE tenant = ? AND device = ? "
            "AND time_ms >= ? AND time_ms < ? ORDER BY time_ms LIMIT ?",
            (tenant, device, start_ms, end_ms, -1 if limit is None else limit),
        ).fetchall()
        return _batch(tenant, rows)

    async def count(self, tenant: str, device: str | None = None) -> int:
        return await self._run(self._reader, self._count, tenant, device)

    def _count(self, tenant: str, device: str | None) -> int:
        assert self._rconn is not None
        args: tuple[str, ...]
        if device is None:
            sql, args = "SELECT count(*) FROM fixes WHERE tenant = ?", (tenant,)
        else:
            sql = "SELECT count(*) FROM fixes WHERE tenant = ? AND device = ?"
            args = (tenant, device)
        return int(self._rconn.execute(sql, args).fetchone()[0])

    async def newest_positions(self) -> AsyncIterator[FixBatch]:
        tenants = await self._run(self._reader, self._tenants)
        for tenant in tenants:
            rows = await self._run(self._reader, self._newest, tenant)
            yield _batch(tenant, rows)

    def _tenants(self) -> list[str]:
        assert self._rconn is not None
        return [
            r[0] for r in self._rconn.execute("SELECT DISTINCT tenant FROM devices")
        ]

    def _newest(self, tenant: str) -> list[tuple]:
        assert self._rconn is not None
        return self._rconn.execute(
            f"SELECT {', '.join(COLUMNS)} FROM devices WHERE tenant = ?", (tenant,)
        ).fetchall()

    async def erase_device(self, tenant: str, device: str) -> int:
        return await self._run(self._writer, self._erase, tenant, device)

    def _erase(self, tenant: str, device: str) -> int:
        assert self._wconn is not None
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        try:
            deleted = conn.execute(
                "DELETE FROM fixes WHERE tenant = ? AND device = ?", (tenant, device)
            ).rowcount
            for table in ("devices", "activity_checkpoints", "assigned_routes"):
                conn.execute(
                    f"DELETE FROM {table} WHERE tenant = ? AND device = ?",
                    (tenant, device),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(deleted)

    async def purge_before(self, cutoff_ms: int) -> Purged:
        return await self._run(self._writer, self._purge, cutoff_ms)

    def _purge(self, cutoff_ms: int) -> Purged:
        """One transaction; a full scan of the fixes (no index leads with time)."""
        assert self._wconn is not None
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        try:
            deleted = conn.execute(
                "DELETE FROM fixes WHERE time_ms < ?", (cutoff_ms,)
            ).rowcount
            gone = conn.execute(
                "DELETE FROM devices WHERE time_ms < ? RETURNING tenant, device",
                (cutoff_ms,),
            ).fetchall()
            conn.execute(
                "DELETE FROM activity_checkpoints WHERE applied_ms < ?", (cutoff_ms,)
            )
            routes = conn.execute(
                "DELETE FROM assigned_routes WHERE ended != 0 AND applied_ms < ?",
                (cutoff_ms,),
            ).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return Purged(int(deleted), 0, [(t, d) for t, d in gone], int(routes))

    async def save_checkpoints(self, checkpoints: Checkpoints) -> None:
        if checkpoints.devices:
            await self._run(self._writer, self._save_checkpoints, checkpoints)

    def _save_checkpoints(self, checkpoints: Checkpoints) -> None:
        assert self._wconn is not None
        rows = zip(
            [checkpoints.tenant] * len(checkpoints.devices),
            checkpoints.devices,
            checkpoints.applied_ms.tolist(),
            checkpoints.states,
            strict=True,
        )
        self._execute_many(UPSERT_CHECKPOINT, list(rows))

    async def load_checkpoints(
        self, tenant: str, devices: Sequence[str]
    ) -> Checkpoints:
        return await self._run(
            self._reader, self._load_checkpoints, tenant, list(devices)
        )

    def _load_checkpoints(self, tenant: str, devices: list[str]) -> Checkpoints:
        assert self._rconn is not None
        rows: list[tuple] = []
        for start in range(0, len(devices), 500):
            chunk = devices[start : start + 500]
            rows += self._rconn.execute(
                "SELECT device, applied_ms, state FROM activity_checkpoints "
                f"WHERE tenant = ? AND device IN ({', '.join('?' * len(chunk))})",
                [tenant, *chunk],
            ).fetchall()
        return Checkpoints(
            tenant,
            [r[0] for r in rows],
            np.array([r[1] for r in rows], dtype=np.int64),
            [bytes(r[2]) for r in rows],
        )

    async def erase_checkpoint(self, tenant: str, device: str) -> None:
        await self._run(self._writer, self._erase_checkpoint, tenant, device)

    def _erase_checkpoint(self, tenant: str, device: str) -> None:
        assert self._wconn is not None
        self._wconn.execute(
            "DELETE FROM activity_checkpoints WHERE tenant = ? AND device = ?",
            (tenant, device),
        )

    async def fixes_since(self, tenant: str, since_ms: Mapping[str, int]) -> FixBatch:
        return await self._run(self._reader, self._fixes_since, tenant, since_ms)

    def _fixes_since(self, tenant: str, since_ms: Mapping[str, int]) -> FixBatch:
        assert self._rconn is not None
        rows: list[tuple] = []
        for device, start in sorted(since_ms.items()):
            rows += self._rconn.execute(
                f"SELECT {', '.join(COLUMNS)} FROM fixes WHERE tenant = ? "
                "AND device = ? AND time_ms >= ? ORDER BY time_ms",
                (tenant, device, int(start)),
            ).fetchall()
        return _batch(tenant, rows)

    async def fixes_before(
        self,
        tenant: str,
        bounds: Mapping[str, tuple[int, int]],
        limit: int,
        recent_ms: int | None = None,
    ) -> FixBatch:
        return await self._run(
            self._reader, self._fixes_before, tenant, bounds, limit, recent_ms
        )

    def _fixes_before(
        self,
        tenant: str,
        bounds: Mapping[str, tuple[int, int]],
        limit: int,
        recent_ms: int | None,
    ) -> FixBatch:
        assert self._rconn is not None
        received = COLUMNS.index("received_ms")
        rows: list[tuple] = []
        for device, (start, end) in sorted(bounds.items()):
            newest = self._rconn.execute(
                f"SELECT {', '.join(COLUMNS)} FROM fixes WHERE tenant = ? "
                "AND device = ? AND time_ms >= ? AND time_ms < ? "
                "ORDER BY time_ms DESC LIMIT ?",
                (tenant, device, int(start), int(end), int(limit)),
            ).fetchall()
            kept = []
            for row in newest:
                kept.append(row)
                if recent_ms is not None and row[received] < recent_ms:
                    break  # the newest received before: no older one
            rows += reversed(kept)
        return _batch(tenant, rows)

    async def assign_route(self, route: StoredRoute) -> None:
        await self._run(
            self._writer, self._execute_many, ASSIGN_ROUTE, [route_row(route)]
        )

    async def save_route_checkpoints(
        self, checkpoints: Sequence[RouteCheckpoint]
    ) -> None:
        rows = [{**asdict(c), "ended": int(c.ended)} for c in checkpoints]
        if rows:
            await self._run(
                self._writer, self._execute_many, SAVE_ROUTE_CHECKPOINT, rows
            )

    def _execute_many(self, statement: str, rows: list) -> None:
        """``statement`` for each row, in one write transaction."""
        assert self._wconn is not None
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(statement, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def clear_route(self, tenant: str, device: str) -> bool:
        return await self._run(self._writer, self._clear_route, tenant, device)

    def _clear_route(self, tenant: str, device: str) -> bool:
        assert self._wconn is not None
        return (
            self._wconn.execute(
                "DELETE FROM assigned_routes WHERE tenant = ? AND device = ?",
                (tenant, device),
            ).rowcount
            > 0
        )

    async def routes(self, tenant: str, devices: Sequence[str]) -> list[StoredRoute]:
        return await self._run(self._reader, self._routes, tenant, list(devices))

    def _routes(self, tenant: str, devices: list[str]) -> list[StoredRoute]:
        assert self._rconn is not None
        rows: list[tuple] = []
        for start in range(0, len(devices), 500):
            chunk = devices[start : start + 500]
            rows += self._rconn.execute(
                f"SELECT {ROUTE_COLUMNS} FROM assigned_routes "
                f"WHERE tenant = ? AND device IN ({', '.join('?' * len(chunk))})",
                [tenant, *chunk],
            ).fetchall()
        return [stored_route(row) for row in rows]

    async def monitored_routes(
        self, after: tuple[str, str] | None = None, limit: int | None = None
    ) -> list[StoredRoute]:
        tenant, device = after if after is not None else ("", "")
        return await self._run(
            self._reader, self._monitored_routes, tenant, device, limit
        )

    def _monitored_routes(
        self, tenant: str, device: str, limit: int | None
    ) -> list[StoredRoute]:
        assert self._rconn is not None
        rows = self._rconn.execute(
            MONITORED_ROUTES, (tenant, device, -1 if limit is None else limit)
        ).fetchall()
        return [stored_route(row) for row in rows]

    async def ping(self) -> None:
        await self._run(self._reader, self._ping)

    def _ping(self) -> None:
        assert self._rconn is not None
        self._rconn.execute("SELECT 1")

    async def close(self) -> None:
        for pool, conn in ((self._writer, self._wconn), (self._reader, self._rconn)):
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(pool, conn.close)
            pool.shutdown(wait=True)
        self._wconn = self._rconn = None


def _max_seq_per_device(device: np.ndarray, seq: np.ndarray) -> dict[str, int]:
    names, inverse = np.unique(device.astype(str), return_inverse=True)
    top = np.zeros(len(names), dtype=np.uint64)
    np.maximum.at(top, inverse, seq)
    return dict(zip(names.tolist(), top.tolist(), strict=True))
