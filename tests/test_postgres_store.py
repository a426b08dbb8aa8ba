"""PostgreSQL specifics: migrations, the start-up check, partitions and indexes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from urllib.parse import quote

import numpy as np
import psycopg
import pytest

from tests.backends import unique_tenant
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import (
    FailedPrecondition,
    InvalidArgument,
    StorageUnavailable,
)
from tracking_grpc.storage import pgcopy, schema
from tracking_grpc.storage.postgres import (
    DAY_MS,
    TRUNCATE_STAGING_AFTER_ROWS,
    PostgresHistoryStore,
    text_array,
    utc_date,
)

T0 = 1_750_000_000_000


async def test_store_refuses_an_unmigrated_database(pg_blank_url) -> None:
    with pytest.raises(FailedPrecondition, match="run `tracking migrate`"):
        await PostgresHistoryStore.open(pg_blank_url)


async def test_migrate_applies_each_migration_once(pg_blank_url) -> None:
    versions = [m.version for m in schema.available()]
    assert await schema.migrate(pg_blank_url) == versions
    assert await schema.migrate(pg_blank_url) == []
    store = await PostgresHistoryStore.open(pg_blank_url)
    await store.close()


async def test_migrate_creates_postgis(pg_blank_url) -> None:
    await schema.migrate(pg_blank_url)
    async with await psycopg.AsyncConnection.connect(pg_blank_url) as conn:
        cur = await conn.execute("SELECT postgis_version()")
        assert (await cur.fetchone())[0].startswith("3")


def partitions(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'fixes'::regclass"
        ).fetchall()
    return {name for (name,) in rows}


def day_name(time_ms: int) -> str:
    return "fixes_" + time.strftime("%Y%m%d", time.gmtime(time_ms / 1000))


async def test_partitions_exist_ahead_of_need(pg_url) -> None:
    store = await PostgresHistoryStore.open(pg_url)
    now_ms = int(time.time() * 1000)
    names = partitions(pg_url)
    assert {day_name(now_ms + d * DAY_MS) for d in range(-1, 8)} <= names
    assert "fixes_default" in names
    await store.close()


async def test_a_new_day_prepares_the_next_week(pg_url) -> None:
    store = await PostgresHistoryStore.open(pg_url)
    later_ms = int(time.time() * 1000) + 5 * DAY_MS
    await store.prepare_partitions(later_ms)
    assert day_name(later_ms + 7 * DAY_MS) in partitions(pg_url)
    await store.close()


async def test_an_old_day_gets_its_partition_on_demand(pg_url) -> None:
    store = await PostgresHistoryStore.open(pg_url)
    old_ms = 1_500_000_000_000
    batch = FixBatch.from_rows(unique_tenant(), [("a", 1, old_ms, 1.0, 2.0)])
    assert (await store.store(batch)).tolist() == [True]
    assert day_name(old_ms) in partitions(pg_url)
    await store.close()


def test_a_partition_is_logged_by_its_date_not_its_day_number() -> None:
    assert utc_date(1_500_000_000_000 // DAY_MS) == "2017-07-14"
    assert utc_date(0) == "1970-01-01"


async def test_a_day_already_in_the_default_partition_stays_there(pg_url) -> None:
    day_ms = 1_400_000_000_000 // DAY_MS * DAY_MS
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO fixes_default (tenant, device, time_ms, seq, position,"
            " received_ms) VALUES ('x', 'x', %s, 1, ST_MakePoint(0, 0), 0)",
            [day_ms + 5],
        )
    store = await PostgresHistoryStore.open(pg_url)
    batch = FixBatch.from_rows(unique_tenant(), [("a", 1, day_ms + 9, 1.0, 2.0)])
    assert (await store.store(batch)).tolist() == [True]
    assert day_name(day_ms) not in partitions(pg_url)
    await store.close()


@pytest.mark.parametrize(
    ("query", "index"),
    [
        pytest.param(
            "SELECT * FROM fixes WHERE tenant = 't' AND device = 'd'"
            " AND time_ms >= {t} AND time_ms < {t} + 3600000",
            "device = 'd'", id="device-time-range",
        ),
        pytest.param(
            "SELECT * FROM fixes WHERE position && ST_MakeEnvelope(-74, 40, -73, 41,"
            " 4326) AND time_ms >= {t} AND time_ms < {t} + 3600000",
            "position", id="area-time-range",
        ),
        pytest.param(
            "SELECT * FROM fixes WHERE ST_DWithin(position, ST_SetSRID("
            "ST_MakePoint(-74, 40.7), 4326), 0.01) AND time_ms >= {t}"
            " AND time_ms < {t} + 3600000",
            "position", id="distance-time-range",
        ),
    ],
)  # fmt: skip
def test_access_paths_use_an_index_and_prune_partitions(pg_url, query, index) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0] for r in conn.execute("EXPLAIN " + query.format(t=T0)).fetchall()
        )
    assert "Index" in plan and index in plan
    assert plan.count(" on fixes_") <= 2  # one day's partition (and its index)


async def test_device_state_survives_a_restart(pg_url) -> None:
    tenant = unique_tenant()
    store = await PostgresHistoryStore.open(pg_url)
    await store.store(FixBatch.from_rows(tenant, [("a", 9, T0, 1.0, 2.0)]))
    await store.close()
    reopened = await PostgresHistoryStore.open(pg_url)
    assert (await reopened.device_states(tenant, ["a"]))["a"].last_stored_seq == 9
    await reopened.close()


async def test_store_rejects_seq_beyond_bigint(pg_url) -> None:
    store = await PostgresHistoryStore.open(pg_url)
    batch = FixBatch.from_rows("t", [("a", 2**63, T0, 1.0, 2.0)])
    with pytest.raises(InvalidArgument, match="seq"):
        await store.store(batch)
    await store.close()


AWKWARD_IDS = [
    "a", "", " spaced ", 'quo"te', "back\\slash", "com,ma", "{brace}", "NULL",
    "null", "Zürich-車", "\\\"", "trailing\\", "🚚 truck", '"', "\\",
]  # fmt: skip


def test_text_array_literal_reads_back_as_the_same_strings(pg_url) -> None:
    with psycopg.connect(pg_url) as conn:
        for values in (AWKWARD_IDS, [], [""], ["x"]):
            got = conn.execute("SELECT %s::text[]", [text_array(values)]).fetchone()
            assert got is not None and got[0] == values


async def test_awkward_device_ids_are_stored_under_their_own_names(pg_url) -> None:
    tenant = unique_tenant()
    store = await PostgresHistoryStore.open(pg_url)
    rows = [(d, 1 + i, T0 + i, 1.0, 2.0) for i, d in enumerate(AWKWARD_IDS)]
    stored = await store.store(FixBatch.from_rows(tenant, rows))
    assert stored.all()
    states = await store.device_states(tenant, AWKWARD_IDS)
    assert {d: s.last_stored_seq for d, s in states.items()} == {
        d: 1 + i for i, d in enumerate(AWKWARD_IDS)
    }
    assert (await store.store(FixBatch.from_rows(tenant, rows))).sum() == 0
    await store.close()


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        pytest.param([0, -1, 2**15 - 1, -(2**15)], ">i2", id="smallint"),
        pytest.param([7, -(2**31), 2**31 - 1], ">i4", id="integer"),
        pytest.param([2**63 - 1, -(2**63), 0], ">i8", id="bigint"),
        pytest.param([1.5, math.nan, -0.25, 3.4e38], ">f4", id="real-with-nan"),
        pytest.param([51.123456789012, -180.0, math.nan, 5e-324], ">f8", id="double"),
        pytest.param([], ">i8", id="empty"),
    ],
)  # fmt: skip
def test_binary_array_parameters_read_back(pg_url, values, kind) -> None:
    sent = np.array(values, dtype=kind)
    with psycopg.connect(pg_url) as conn:
        conn.adapters.register_dumper(pgcopy.BinaryArray, pgcopy.BinaryArrayDumper)
        row = conn.execute("SELECT %s", [pgcopy.BinaryArray.of(sent, kind)]).fetchone()
    assert row is not None
    np.testing.assert_array_equal(np.array(row[0], dtype=kind), sent)


async def test_a_failed_commit_leaves_no_device_state(pg_url) -> None:
    """The three statements of a store are one transaction: when the insert of
    the fixes fails, the devices' rows advanced before it are rolled back."""
    tenant, day_ms = unique_tenant(), 1_200_000_000_000 // DAY_MS * DAY_MS
    store = await PostgresHistoryStore.open(
        pg_url + "?options=" + quote("-c lock_timeout=200")
    )
    first = FixBatch.from_rows(tenant, [("a", 1, day_ms + 1, 1.0, 2.0)])
    assert (await store.store(first)).all()  # the day's partition exists now
    with psycopg.connect(pg_url) as holder:
        holder.execute(f"LOCK TABLE {day_name(day_ms)} IN ACCESS EXCLUSIVE MODE")
        second = FixBatch.from_rows(
            tenant, [("a", 2, day_ms + 2, 1.0, 2.0), ("b", 1, day_ms + 2, 1.0, 2.0)]
        )
        with pytest.raises(StorageUnavailable, match="lock timeout"):
            await store.store(second)
    states = await store.device_states(tenant, ["a", "b"])
    assert {d: s.last_stored_seq for d, s in states.items()} == {"a": 1}
    assert (await store.store(second)).all()
    await store.close()


def test_copy_stream_rejects_foreign_bytes() -> None:
    with pytest.raises(ValueError, match="binary COPY"):
        pgcopy.decode_rows(b"not copy", [">i8"])


def tracking(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tracking_grpc", *args]
    environ = {**os.environ, "TRACKING_LOG_FORMAT": "text", **(env or {})}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=environ
    )


def test_serve_refuses_until_migrate_has_run(pg_blank_url) -> None:
    refused = tracking(
        "serve", "--listen", "127.0.0.1:0", "--database-url", pg_blank_url
    )
    assert refused.returncode == 2 and "run `tracking migrate`" in refused.stderr
    done = tracking("migrate", env={"TRACKING_DATABASE_URL": pg_blank_url})
    assert done.returncode == 0 and "applied migrations [1, 2" in done.stdout
    again = tracking("migrate", "--database-url", pg_blank_url)
    assert "nothing to apply" in again.stdout


@pytest.mark.parametrize("lag", ["state set back", "state row deleted"])
async def test_a_device_state_behind_its_stored_fixes_still_keeps_each_fix_once(
    pg_url, lag, caplog
) -> None:
    """Fixes past their device's state go in without key checks. Should the state
    lag the stored fixes, a fix repeating a stored one must still come back as a
    duplicate (not fail the commit), and the fixes beside it be stored."""
    tenant = unique_tenant()
    store = await PostgresHistoryStore.open(pg_url)
    stored = FixBatch.from_rows(
        tenant, [("a", 1, T0, 1.0, 2.0), ("a", 2, T0 + 1_000, 1.0, 2.0)]
    )
    assert (await store.store(stored)).all()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        if lag == "state set back":
            conn.execute(
                "UPDATE devices SET last_stored_seq = 1, last_time_ms = %s"
                " WHERE tenant = %s",
                [T0, tenant],
            )
        else:
            conn.execute("DELETE FROM devices WHERE tenant = %s", [tenant])
    again = FixBatch.from_rows(
        tenant,
        [
            ("a", 3, T0 + 1_000, 1.0, 2.0),  # the time of stored seq 2
            ("a", 4, T0 + 2_000, 1.0, 2.0),
            ("b", 1, T0, 1.0, 2.0),
        ],
    )
    new = await store.store(again)
    assert new.tolist() == [False, True, True]
    assert "device state behind stored fixes" in caplog.text
    assert await store.count(tenant, "a") == 3
    states = await store.device_states(tenant, ["a"])
    assert (states["a"].last_stored_seq, states["a"].last_time_ms) == (4, T0 + 2_000)
    assert (await store.store(again)).tolist() == [False, False, False]
    await store.close()


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(
            "DELETE FROM geofence_events WHERE tenant = 't' AND device = 'd'",
            id="erase-device",
        ),
        pytest.param(
            "SELECT * FROM geofence_events WHERE tenant = 't' AND time_ms >= 0"
            ' AND time_ms < 9 AND device = \'d\' ORDER BY time_ms, event_id COLLATE "C"'
            " LIMIT 100",
            id="list-device-events",
        ),
    ],
)  # fmt: skip
def test_one_devices_events_are_found_by_their_index(pg_url, query) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + query).fetchall())
    assert "geofence_events_device" in plan


def test_one_routes_events_are_found_by_their_index(pg_url) -> None:
    """ListEvents with a route_id, as the repository asks it (migration 0010)."""
    query = (
        "SELECT * FROM geofence_events WHERE tenant = 't' AND time_ms >= 0"
        " AND time_ms < 9 AND route_id = 'r' AND route_id <> ''"
        ' ORDER BY time_ms, event_id COLLATE "C" LIMIT 100'
    )
    with psycopg.connect(pg_url) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + query).fetchall())
    assert "geofence_events_route" in plan


async def test_the_write_leaves_its_temporary_tables_empty_and_small(pg_url) -> None:
    # The staging tables are emptied by the write itself (a truncation at every
    # commit waited on the file system) and truncated once enough rows went
    # through; a connection's files must not grow with every write.
    store = await PostgresHistoryStore.open(pg_url, max_connections=1)
    tenant = unique_tenant()
    sizes = []
    for write in range(120):
        rows = [
            (f"d{i}", write + 1, T0 + write * 1000 + i, 1.0, 2.0) for i in range(90)
        ]
        assert (await store.store(FixBatch.from_rows(tenant, rows))).all()
        async with store._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM staging) + (SELECT count(*) FROM prior),"
                " pg_relation_size('staging') + pg_relation_size('prior')"
            )
            left, size = await cur.fetchone()
        assert left == 0
        sizes.append(size)
    assert max(sizes) <= 2 * 8192 * (TRUNCATE_STAGING_AFTER_ROWS // 50 + 2)
    assert min(sizes[-60:]) < max(sizes[-60:])  # truncated in between
    await store.close()


async def test_device_state_is_rewritten_in_place(pg_url) -> None:
    # Every commit rewrites its devices' state rows. With half of each page free
    # the new version fits beside the old (a heap-only update), and the next visit
    # prunes the old: the table stays the size of its rows instead of growing by a
    # row version per fix until a vacuum (on full pages it grew elevenfold in 30
    # rewrites of 10,000 devices).
    store = await PostgresHistoryStore.open(pg_url, max_connections=1)
    tenant = unique_tenant()
    devices = [f"d{i}" for i in range(2_000)]
    lat = np.full(len(devices), 47.0)

    async def write(round_: int) -> None:
        times = [T0 + round_ * 1000] * len(devices)
        seqs = [round_ + 1] * len(devices)
        batch = FixBatch.from_columns(tenant, devices, seqs, times, lat, lat)
        assert (await store.store(batch)).all()

    def pages() -> int:
        with psycopg.connect(pg_url) as conn:
            return conn.execute("SELECT pg_relation_size('devices') / 8192").fetchone()[
                0
            ]

    await write(0)
    first = pages()
    for round_ in range(1, 21):
        await write(round_)
    await store.close()
    assert pages() <= first + 2 * len(devices) // 40 + 5
