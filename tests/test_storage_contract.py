"""One contract for the repositories, run against every backend set: the embedded
one (SQLite history, live state in the process) and the production one (PostgreSQL
with PostGIS, Redis single and Cluster).

Each test gets a fresh tenant, so the backends' shared database and key space are
safe to reuse across tests.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import psycopg
import pytest

from tests.backends import unique_tenant
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.interest import TenantInterest
from tracking_grpc.storage.base import Checkpoints, RouteCheckpoint, StoredRoute
from tracking_grpc.storage.memory import LocalBroker, MemoryLiveStore
from tracking_grpc.storage.postgres import PostgresHistoryStore
from tracking_grpc.storage.redis_broker import RedisBroker
from tracking_grpc.storage.redis_live import RedisLiveStore

T0 = 1_750_000_000_000


@pytest.fixture
def history(history_store):
    """The history store of each backend (tests.backends.history_store)."""
    return history_store


def fixes(tenant: str, rows: list[tuple[str, int, int]]) -> FixBatch:
    """(device, seq, seconds after T0) rows at positions that vary with seq."""
    return FixBatch.from_rows(
        tenant,
        [(d, s, T0 + 1000 * t, 40.0 + s * 1e-4, -74.0 - s * 1e-4) for d, s, t in rows],
    )


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        pytest.param([("a", 1, 0)], [("a", 1, 0)], [False], id="exact-resend"),
        pytest.param([("a", 1, 0)], [("a", 1, 5)], [False], id="same-seq-new-time"),
        pytest.param([("a", 1, 0)], [("a", 2, 0)], [False], id="same-time-new-seq"),
        pytest.param([("a", 1, 0)], [("b", 1, 0)], [True], id="other-device"),
        pytest.param([("a", 5, 10)], [("a", 3, 2)], [True], id="late-fix-lower-seq"),
        pytest.param([], [("a", 1, 0), ("a", 1, 0)], [True, False], id="in-batch"),
        pytest.param([], [("a", 1, 0), ("a", 2, 0)], [True, False], id="batch-time"),
    ],
)
async def test_store_reports_new_fixes(history, first, second, expected) -> None:
    tenant = unique_tenant()
    if first:
        await history.store(fixes(tenant, first))
    mask = await history.store(fixes(tenant, second))
    assert mask.tolist() == expected


async def test_store_round_trips_every_column(history) -> None:
    tenant = unique_tenant()
    batch = FixBatch.from_columns(
        tenant, ["a", "a"], [1, 2], [T0, T0 + 1000], [40.7, 40.8], [-74.0, 179.9],
        accuracy_m=[5.0, np.nan], speed_mps=[1.5, 0.0], provider=[1, 2],
        received_ms=np.array([T0 + 50, T0 + 1050]),
    )  # fmt: skip
    await history.store(batch)
    got = await history.history(tenant, "a", T0, T0 + 2000)
    for name in (
        "seq",
        "time_ms",
        "lat",
        "lon",
        "speed_mps",
        "provider",
        "received_ms",
    ):
        np.testing.assert_array_equal(getattr(got, name), getattr(batch, name))
    np.testing.assert_array_equal(got.accuracy_m, batch.accuracy_m)  # NaN == NaN here


async def test_history_is_in_fix_time_order_within_range(history) -> None:
    tenant = unique_tenant()
    await history.store(fixes(tenant, [("a", 1, 30), ("a", 2, 10), ("a", 3, 20)]))
    await history.store(fixes(tenant, [("a", 4, 40), ("b", 1, 15)]))
    got = await history.history(tenant, "a", T0 + 10_000, T0 + 40_000)
    assert got.seq.tolist() == [2, 3, 1]
    limited = await history.history(tenant, "a", T0, T0 + 50_000, limit=2)
    assert limited.seq.tolist() == [2, 3]


async def test_device_state_tracks_highest_seq_and_newest_time(history) -> None:
    tenant = unique_tenant()
    await history.store(fixes(tenant, [("a", 7, 30), ("a", 8, 10)]))
    states = await history.device_states(tenant, ["a", "never-seen"])
    assert list(states) == ["a"]
    assert (states["a"].last_stored_seq, states["a"].last_time_ms) == (8, T0 + 30_000)


@pytest.mark.parametrize(
    "resend",
    [
        pytest.param([("a", 2, 0)], id="same-time-new-seq"),
        pytest.param([("a", 1, 30)], id="same-seq-new-time"),
        pytest.param([("a", 1, 30), ("a", 2, 0), ("b", 1, 0)], id="mixed-with-new"),
    ],
)
async def test_duplicates_leave_the_device_state_as_stored(history, resend) -> None:
    tenant = unique_tenant()
    await history.store(fixes(tenant, [("a", 1, 0)]))
    await history.store(fixes(tenant, resend))
    state = (await history.device_states(tenant, ["a"]))["a"]
    assert (state.last_stored_seq, state.last_time_ms) == (1, T0)


async def test_concurrent_duplicate_stores_keep_each_fix_once(history) -> None:
    tenant = unique_tenant()
    rows = [("a", s, s) for s in range(1, 200)] + [("b", s, s) for s in range(1, 50)]
    batch = fixes(tenant, rows)
    masks = await asyncio.gather(*(history.store(batch) for _ in range(4)))
    assert np.sum(masks, axis=0).tolist() == [1] * len(rows)
    assert await history.count(tenant) == len(rows)


async def test_concurrent_stores_of_one_seq_at_other_times_keep_one(history) -> None:
    # The same seqs with a different fix time in each writer: no unique key catches
    # these, only the writers' serialisation on the (existing) device rows does.
    tenant = unique_tenant()
    await history.store(fixes(tenant, [("a", 1, 0), ("b", 1, 0)]))
    batches = [
        fixes(
            tenant, [(d, s, 1000 * w + s) for d in ("a", "b") for s in range(2, 3000)]
        )
        for w in range(1, 5)
    ]
    masks = await asyncio.gather(*(history.store(b) for b in batches))
    assert np.sum(masks, axis=0).tolist() == [1] * len(batches[0])
    assert await history.count(tenant) == len(batches[0]) + 2
    states = await history.device_states(tenant, ["a", "b"])
    assert {d: s.last_stored_seq for d, s in states.items()} == {"a": 2999, "b": 2999}


async def test_stored_as_received_finds_only_this_receipts_fixes(history) -> None:
    """What a retried store asks: which fixes are stored as this very submission
    received them. A resend of a stored fix is received later; a fix at a stored
    one's time with another seq, or never stored, or of another tenant is not it."""
    tenant, received = unique_tenant(), T0 + 100_000
    rows = [("a", 1, 0), ("a", 2, 90_000), ("b", 1, 0)]  # a's fixes a day apart
    sent = fixes(tenant, rows).with_received(received)
    await history.store(sent)
    assert (await history.stored_as_received(sent)).tolist() == [True] * 3
    probe = FixBatch.concat(
        [
            sent.with_received(received + 1),  # resends
            fixes(tenant, [("a", 9, 0), ("a", 3, 5)]).with_received(received),
            sent.take(np.array([1])),
        ]
    )
    found = await history.stored_as_received(probe)
    assert found.tolist() == [False] * 5 + [True]
    elsewhere = replace(sent, tenant=unique_tenant())
    assert (await history.stored_as_received(elsewhere)).tolist() == [False] * 3
    assert len(await history.stored_as_received(FixBatch.empty(tenant))) == 0


async def test_count_and_erase_are_per_device(history) -> None:
    tenant = unique_tenant()
    await history.store(fixes(tenant, [("a", 1, 0), ("a", 2, 1), ("b", 1, 0)]))
    assert (await history.count(tenant), await history.count(tenant, "a")) == (3, 2)
    assert await history.erase_device(tenant, "a") == 2
    assert await history.count(tenant) == 1
    assert await history.device_states(tenant, ["a"]) == {}


def checkpoints(tenant: str, rows: list[tuple[str, int, bytes]]) -> Checkpoints:
    devices, applied, states = zip(*rows, strict=True) if rows else ((), (), ())
    return Checkpoints(tenant, list(devices), np.array(applied), list(states))


async def loaded(history, tenant: str, devices: list[str]) -> dict:
    got = await history.load_checkpoints(tenant, devices)
    pairs = zip(got.applied_ms.tolist(), got.states, strict=True)
    return dict(zip(got.devices, pairs, strict=True))


async def test_checkpoints_keep_the_one_that_covers_most(history) -> None:
    tenant = unique_tenant()
    await history.save_checkpoints(
        checkpoints(tenant, [("a", 5, b"A5"), ("b", 5, b"B")])
    )
    await history.save_checkpoints(
        checkpoints(tenant, [("a", 7, b"A7"), ("b", 3, b"x")])
    )
    assert await loaded(history, tenant, ["a", "b", "c"]) == {
        "a": (7, b"A7"),
        "b": (5, b"B"),  # a process that got less far does not overwrite it
    }
    assert await loaded(history, unique_tenant(), ["a"]) == {}


async def test_erasure_deletes_the_checkpoint(history) -> None:
    tenant = unique_tenant()
    await history.store(fixes(tenant, [("a", 1, 0), ("b", 1, 0)]))
    await history.save_checkpoints(
        checkpoints(tenant, [("a", T0, b"A"), ("b", T0, b"B")])
    )
    await history.erase_device(tenant, "a")
    assert list(await loaded(history, tenant, ["a", "b"])) == ["b"]
    await history.erase_checkpoint(tenant, "b")
    assert await loaded(history, tenant, ["a", "b"]) == {}


async def test_fixes_since_reads_each_device_from_its_own_time(history) -> None:
    tenant = unique_tenant()
    rows = [
        ("a", 1, 0),
        ("a", 2, 5),
        ("a", 3, 9),
        ("b", 1, 2),
        ("b", 2, 4),
        ("c", 1, 1),
    ]
    await history.store(fixes(tenant, rows))
    got = await history.fixes_since(tenant, {"b": T0 + 3000, "a": T0 + 5000})
    assert list(zip(got.device.tolist(), got.seq.tolist(), strict=True)) == [
        ("a", 2), ("a", 3), ("b", 2)
    ]  # fmt: skip
    assert len(await history.fixes_since(tenant, {})) == 0


async def test_fixes_before_reads_each_device_s_newest_in_its_own_range(
    history,
) -> None:
    tenant = unique_tenant()
    rows = [("a", n, n) for n in range(1, 8)] + [("b", 1, 2), ("b", 2, 4)]
    await history.store(fixes(tenant, [*rows, ("c", 1, 1)]))
    bounds = {"b": (T0, T0 + 4000), "a": (T0 + 2000, T0 + 7000)}

    got = await history.fixes_before(tenant, bounds, 3)

    assert list(zip(got.device.tolist(), got.seq.tolist(), strict=True)) == [
        ("a", 4), ("a", 5), ("a", 6), ("b", 1)
    ]  # fmt: skip
    assert len(await history.fixes_before(tenant, {}, 3)) == 0


async def test_fixes_before_keeps_one_fix_received_before_recent_ms(history) -> None:
    """The newest fix received before ``recent_ms`` is the last one read (a
    later one received after it, but older, is left out too)."""
    tenant = unique_tenant()
    made = fixes(tenant, [("a", n, n) for n in range(1, 8)])
    received = T0 + 1000 * np.array([1, 2, 9, 4, 5, 6, 7])  # seq 3 came late
    await history.store(replace(made, received_ms=received))
    bounds = {"a": (T0, T0 + 7000)}

    got = await history.fixes_before(tenant, bounds, 5, recent_ms=T0 + 5000)

    assert got.seq.tolist() == [4, 5, 6]
    assert (await history.fixes_before(tenant, bounds, 5)).seq.tolist() == [
        2, 3, 4, 5, 6
    ]  # fmt: skip


def assigned(
    tenant: str, device: str, route_id: str, assigned_ms: int = 1, plan: bytes = b"P"
) -> StoredRoute:
    """A route as AssignRoute stores it: no fix applied yet."""
    return StoredRoute(
        plan, RouteCheckpoint(tenant, device, route_id, assigned_ms, 0, b"S0")
    )


async def route_states(history, tenant: str, devices: list[str]) -> dict:
    """device: (route_id, applied_ms, state, ended) of the stored routes."""
    found = await history.routes(tenant, devices)
    return {
        r.checkpoint.device: (
            r.checkpoint.route_id,
            r.checkpoint.applied_ms,
            r.checkpoint.state,
            r.checkpoint.ended,
        )
        for r in found
    }


@pytest.fixture
async def route_tenant(history):
    """A tenant of the test's own whose routes (of devices a-d) are cleared
    afterwards: servers on the session's database load every stored route."""
    tenant = unique_tenant()
    yield tenant
    for device in "abcd":
        await history.clear_route(tenant, device)


async def test_an_assigned_route_replaces_the_devices_other(
    history, route_tenant
) -> None:
    tenant = route_tenant
    await history.assign_route(assigned(tenant, "a", "r1", plan=b"old"))
    await history.assign_route(assigned(tenant, "a", "r2", plan=b"new"))
    await history.assign_route(assigned(tenant, "b", "r3"))
    found = {r.checkpoint.device: r for r in await history.routes(tenant, ["a"])}
    assert list(found) == ["a"]
    assert (found["a"].plan, found["a"].checkpoint) == (
        b"new",
        RouteCheckpoint(tenant, "a", "r2", 1, 0, b"S0"),
    )
    assert await history.routes(unique_tenant(), ["a"]) == []


@pytest.mark.parametrize(
    ("checkpoint", "expected"),
    [
        pytest.param(("r1", 1, 9, False), ("r1", 9, b"new", False), id="newer"),
        pytest.param(("r1", 1, 9, True), ("r1", 9, b"new", True), id="arrived"),
        pytest.param(("r1", 1, 4, False), ("r1", 5, b"S5", False), id="older"),
        pytest.param(("r0", 1, 9, False), ("r1", 5, b"S5", False), id="other-route"),
        pytest.param(("r1", 0, 9, False), ("r1", 5, b"S5", False), id="reassigned"),
    ],
)
async def test_a_route_checkpoint_updates_only_its_own_newer_state(
    history, route_tenant, checkpoint, expected
) -> None:
    tenant = route_tenant
    await history.assign_route(assigned(tenant, "a", "r1"))
    await history.save_route_checkpoints(
        [RouteCheckpoint(tenant, "a", "r1", 1, 5, b"S5")]
    )
    route_id, assigned_ms, applied_ms, ended = checkpoint
    await history.save_route_checkpoints(
        [RouteCheckpoint(tenant, "a", route_id, assigned_ms, applied_ms, b"new", ended)]
    )
    assert await route_states(history, tenant, ["a"]) == {"a": expected}


async def test_cleared_erased_and_ended_routes_are_not_monitored(
    history, route_tenant
) -> None:
    tenant = route_tenant
    for device in ("a", "b", "c", "d"):
        await history.assign_route(assigned(tenant, device, f"r-{device}"))
    await history.store(fixes(tenant, [("b", 1, 0)]))
    await history.save_route_checkpoints(
        [RouteCheckpoint(tenant, "c", "r-c", 1, 5, b"S", ended=True)]
    )
    assert await history.clear_route(tenant, "a")
    assert not await history.clear_route(tenant, "a")
    await history.erase_device(tenant, "b")
    monitored = [
        r.checkpoint.device
        for r in await history.monitored_routes()
        if r.checkpoint.tenant == tenant
    ]
    assert monitored == ["d"]
    assert list(await route_states(history, tenant, ["a", "b", "c"])) == ["c"]


LOCK_ROUTE = (
    "SELECT 1 FROM assigned_routes WHERE tenant = %s AND device = %s FOR UPDATE"
)
BLOCKED_BY = (
    "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
)


@pytest.mark.postgres
async def test_route_checkpoints_lock_their_rows_in_device_order(pg_url) -> None:
    """Two processes saving overlapping routes wait for each other, never deadlock:
    with b locked elsewhere, a save of b and a has a locked already."""
    store = await PostgresHistoryStore.open(pg_url)
    tenant = unique_tenant()
    try:
        for device in ("b", "a"):  # b stored first: a scan of the table meets b first
            await store.assign_route(assigned(tenant, device, "r1"))
        async with (
            await psycopg.AsyncConnection.connect(pg_url) as other,
            await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as watch,
        ):
            await other.execute(LOCK_ROUTE, [tenant, "b"])
            saving = asyncio.create_task(
                store.save_route_checkpoints(
                    [RouteCheckpoint(tenant, d, "r1", 1, 5, b"S5") for d in "ba"]
                )
            )
            async with asyncio.timeout(30):  # until the save waits for b
                while True:
                    cur = await watch.execute(BLOCKED_BY, [other.info.backend_pid])
                    if (await cur.fetchone()) != (0,):
                        break
                    await asyncio.sleep(0.02)
            with pytest.raises(psycopg.errors.LockNotAvailable):
                await other.execute(LOCK_ROUTE + " NOWAIT", [tenant, "a"])
            await other.rollback()
            await saving
        assert (await route_states(store, tenant, ["a", "b"]))["a"][1] == 5
    finally:
        for device in "ab":
            await store.clear_route(tenant, device)
        await store.close()


async def test_tenants_do_not_see_each_other(history) -> None:
    mine, theirs = unique_tenant(), unique_tenant()
    await history.store(fixes(theirs, [("a", 1, 0)]))
    assert await history.count(mine) == 0
    assert len(await history.history(mine, "a", 0, T0 * 2)) == 0
    assert (await history.store(fixes(mine, [("a", 1, 0)]))).tolist() == [True]


async def test_newest_positions_gives_each_devices_newest_fix(history) -> None:
    tenant = unique_tenant()
    await history.store(fixes(tenant, [("a", 1, 5), ("a", 2, 3), ("b", 1, 1)]))
    newest = {}
    async for batch in history.newest_positions():
        if batch.tenant == tenant:
            newest |= dict(zip(batch.device, batch.seq.tolist(), strict=True))
    assert newest == {"a": 1, "b": 1}


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def live(request: pytest.FixtureRequest):
    if request.param == "memory":
        store = MemoryLiveStore()
    else:
        if request.param == "redis-cluster":
            url = request.getfixturevalue("redis_cluster")[0]
        else:
            url = request.getfixturevalue("redis_url")
        store = await RedisLiveStore.open(url, request.getfixturevalue("redis_prefix"))
    yield store
    await store.close()


def at(tenant: str, rows: list[tuple[str, int, float, float]]) -> FixBatch:
    """(device, seconds after T0, lat, lon) rows; seq counts the seconds."""
    return FixBatch.from_rows(
        tenant, [(d, t, T0 + 1000 * t, y, x) for d, t, y, x in rows]
    )


async def test_live_update_never_moves_backwards(live) -> None:
    tenant = unique_tenant()
    moved = await live.update(at(tenant, [("a", 10, 1.0, 1.0), ("a", 12, 1.2, 1.2)]))
    assert moved.seq.tolist() == [12]
    late = await live.update(at(tenant, [("a", 11, 9.0, 9.0), ("a", 12, 9.0, 9.0)]))
    assert len(late) == 0
    assert (await live.get(tenant, ["a"])).lat.tolist() == [1.2]


async def test_live_get_keeps_the_requested_order(live) -> None:
    tenant = unique_tenant()
    await live.update(at(tenant, [(f"d{i}", 1, 10.0 + i, 20.0) for i in range(30)]))
    got = await live.get(tenant, ["d7", "missing", "d3", "d29"])
    assert got.device.tolist() == ["d7", "d3", "d29"]
    assert got.lat.tolist() == [17.0, 13.0, 39.0]


@pytest.mark.parametrize(
    ("centre", "positions", "expected"),
    [
        pytest.param(
            (40.70, -74.00), {"near": (40.701, -74.0), "far": (40.75, -74.0)},
            ["near"], id="inside-radius-only",
        ),
        pytest.param(
            (41.00, -74.00), {"n": (41.002, -74.0), "s": (40.999, -74.0)},
            ["s", "n"], id="across-cell-edge-nearest-first",
        ),
        pytest.param(
            (0.0, 179.999), {"east": (0.0, -179.999), "west": (0.0, 179.99)},
            ["east", "west"], id="across-antimeridian",
        ),
        pytest.param(
            (89.9, 0.0), {"pole": (89.9, 5.0), "south": (88.0, 0.0)},
            ["pole"], id="near-north-pole",
        ),
    ],
)  # fmt: skip
async def test_nearby_finds_devices_within_radius(live, centre, positions, expected):
    tenant = unique_tenant()
    rows = [(d, 1, lat, lon) for d, (lat, lon) in positions.items()]
    await live.update(at(tenant, rows))
    found, distance_m = await live.nearby(tenant, *centre, radius_m=2_000.0, limit=10)
    assert found.device.tolist() == expected
    assert np.all(np.diff(distance_m) >= 0) and np.all(distance_m <= 2_000.0)


async def test_nearby_limit_keeps_the_nearest(live) -> None:
    tenant = unique_tenant()
    await live.update(
        at(tenant, [(f"d{i}", 1, 50.0 + i * 1e-3, 8.0) for i in range(20)])
    )
    found, _ = await live.nearby(tenant, 50.0, 8.0, radius_m=50_000.0, limit=3)
    assert found.device.tolist() == ["d0", "d1", "d2"]


async def test_live_device_leaves_its_old_cell(live) -> None:
    tenant = unique_tenant()
    await live.update(at(tenant, [("a", 1, 10.5, 10.5)]))
    await live.update(at(tenant, [("a", 2, 30.5, 30.5)]))
    old, _ = await live.nearby(tenant, 10.5, 10.5, radius_m=1_000.0, limit=5)
    new, _ = await live.nearby(tenant, 30.5, 30.5, radius_m=1_000.0, limit=5)
    assert (len(old), new.device.tolist()) == (0, ["a"])


async def test_live_update_of_many_devices_in_one_cell(live) -> None:
    # More devices in one bucket and one cell than one Lua unpack takes, some
    # moving out of their cell, ids with spaces and non-ASCII letters.
    tenant = unique_tenant()
    devices = [f"gw {i} Zürich-車" for i in range(12_000)]
    first = [(d, 1, 47.3 + i * 1e-6, 8.5) for i, d in enumerate(devices)]
    await live.update(at(tenant, first))
    second = [(d, 2, 47.3 if i % 2 else 46.3, 8.5) for i, d in enumerate(devices)]
    late = ("gw 0 Zürich-車", 1, 0.0, 0.0)  # older than what is stored: ignored
    moved = await live.update(at(tenant, [*second, late]))
    assert sorted(moved.device.tolist()) == sorted(devices)
    got = await live.get(tenant, devices[:4])
    assert got.seq.tolist() == [2] * 4 and got.lat.tolist() == [46.3, 47.3] * 2
    near, _ = await live.nearby(tenant, 46.3, 8.5, radius_m=10.0, limit=20_000)
    assert sorted(near.device.tolist()) == sorted(devices[::2])
    stayed, _ = await live.nearby(tenant, 47.3, 8.5, radius_m=10.0, limit=20_000)
    assert sorted(stayed.device.tolist()) == sorted(devices[1::2])


async def test_snapshot_and_remove_are_per_tenant(live) -> None:
    mine, theirs = unique_tenant(), unique_tenant()
    await live.update(at(mine, [("a", 1, 1.0, 1.0), ("b", 1, 2.0, 2.0)]))
    await live.update(at(theirs, [("c", 1, 1.0, 1.0)]))
    await live.remove(mine, ["a", "nobody", "a"])
    assert (await live.snapshot(mine)).device.tolist() == ["b"]
    found, _ = await live.nearby(mine, 1.0, 1.0, radius_m=1_000.0, limit=5)
    assert len(found) == 0


async def test_live_round_trips_every_column(live) -> None:
    tenant = unique_tenant()
    batch = FixBatch.from_columns(
        tenant, ["a"], [7], [T0], [40.7], [-74.0], accuracy_m=[3.5],
        battery_pct=[np.nan], provider=[2], received_ms=np.array([T0 + 9]),
    )  # fmt: skip
    await live.update(batch)
    got = await live.get(tenant, ["a"])
    for name in (
        "seq",
        "time_ms",
        "lat",
        "lon",
        "accuracy_m",
        "provider",
        "received_ms",
    ):
        np.testing.assert_array_equal(getattr(got, name), getattr(batch, name))
    assert np.isnan(got.battery_pct[0])


@pytest.fixture(params=["local", "redis", "redis-cluster"])
async def broker(request: pytest.FixtureRequest):
    if request.param == "local":
        hub = LocalBroker()
    else:
        fixture = "redis_cluster" if request.param == "redis-cluster" else "redis_url"
        url = request.getfixturevalue(fixture)
        url = url[0] if isinstance(url, list) else url
        hub = await RedisBroker.open(url, request.getfixturevalue("redis_prefix"))
    yield hub
    await hub.close()


async def test_broker_delivers_what_its_subscriber_wants(broker) -> None:
    inbox: list[FixBatch] = []
    tenant = unique_tenant()
    wants = {tenant: TenantInterest(devices=frozenset({"a", "b"}))}
    await broker.subscribe(lambda batch: _put(inbox, batch), lambda: wants)
    await broker.interest_changed()
    sent = at(tenant, [("a", 1, 1.0, 1.0), ("b", 2, 2.0, 2.0)])
    await broker.publish(sent)
    async with asyncio.timeout(5):
        while sum(map(len, inbox)) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    got = FixBatch.concat(inbox)
    assert sorted(got.device) == ["a", "b"] and got.tenant == sent.tenant


async def test_broker_takes_one_subscription(broker) -> None:
    await broker.subscribe(lambda batch: _put([], batch), dict)
    with pytest.raises(RuntimeError):
        await broker.subscribe(lambda batch: _put([], batch), dict)


async def _put(inbox: list, batch: FixBatch) -> None:
    inbox.append(batch)
