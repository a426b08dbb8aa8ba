"""Retention: history older than ``retention_days`` goes, from the stores (SQLite,
PostgreSQL day partitions), through a server that enforces it, and ``tracking
purge``; an arrived route whose save failed stays in memory until it is saved.
Purges cover every tenant, so the PostgreSQL tests get a database of their own."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
from tracking.v1 import (
    common_pb2,
    geofence_pb2,
    geofence_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
    track_pb2,
    track_pb2_grpc,
)

from tests.backends import on_the_stream, stream_owners
from tests.routes import support
from tests.routes.test_assignments import HANG_S, KEPT_IN_MEMORY, planned
from tests.routes.test_assignments import TENANT as ROUTE_TENANT
from tests.server_fixtures import embedded_settings, fix, now_ms, track_session
from tracking_grpc.cli import main
from tracking_grpc.config import Settings
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.retention import DAY_MS, cutoff_ms
from tracking_grpc.routing.assignments import AssignmentKeeper
from tracking_grpc.routing.monitor import RouteMonitor
from tracking_grpc.storage.base import Checkpoints, RouteCheckpoint, StoredRoute
from tracking_grpc.storage.postgres import PostgresHistoryStore
from tracking_grpc.storage.sqlite import SqliteHistoryStore

TENANT = "retained"
TODAY = now_ms() // DAY_MS
OLD_MS = (TODAY - 10) * DAY_MS + 3_600_000  # ten days ago, 01:00 UTC
DEPOT = common_pb2.LatLng(lat=60.17, lon=24.94)
BACKENDS = [
    "embedded",
    pytest.param("postgres-redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
]


def fixes(device: str, times_ms: list[int]) -> FixBatch:
    n = len(times_ms)
    return FixBatch.from_columns(
        TENANT,
        [device] * n,
        np.arange(1, n + 1),
        times_ms,
        np.full(n, 60.17),
        np.full(n, 24.94),
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def history(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator:
    if request.param == "sqlite":
        store = await SqliteHistoryStore.open(tmp_path / "history.sqlite3")
    else:
        url = request.getfixturevalue("private_pg_url")
        store = await PostgresHistoryStore.open(url)
    yield store
    await store.close()


async def test_purge_deletes_fixes_and_devices_past_the_cutoff(history) -> None:
    recent_ms = now_ms() - 60_000
    await history.store(fixes("old", [OLD_MS, OLD_MS + 1_000]))
    await history.store(fixes("mixed", [OLD_MS + 2_000, recent_ms]))

    purged = await history.purge_before(cutoff_ms(now_ms(), 3))

    assert purged.devices == [(TENANT, "old")]
    assert await history.count(TENANT, "old") == 0
    assert await history.count(TENANT, "mixed") == 1
    assert set(await history.device_states(TENANT, ["old", "mixed"])) == {"mixed"}
    if isinstance(history, PostgresHistoryStore):  # the old day's partition, whole
        assert (purged.fixes, purged.partitions) == (0, 1)
        days = await history._fetch("SELECT tracking_partition_days()", [])
        assert TODAY - 10 not in {day for (day,) in days}
        assert TODAY in {day for (day,) in days}
    else:
        assert (purged.fixes, purged.partitions) == (3, 0)


async def test_purge_deletes_activity_checkpoints_applied_before_the_cutoff(
    history,
) -> None:
    recent_ms = now_ms() - 60_000
    saved = Checkpoints(
        TENANT, ["old", "mixed"], np.array([OLD_MS, recent_ms]), [b"o", b"m"]
    )
    await history.save_checkpoints(saved)

    await history.purge_before(cutoff_ms(now_ms(), 3))

    kept = await history.load_checkpoints(TENANT, ["old", "mixed"])
    assert kept.devices == ["mixed"]


async def test_purge_deletes_routes_that_arrived_before_the_cutoff(history) -> None:
    """An arrived route goes with its arrival fix (the last its monitoring
    applied); a route still followed stays, however old its last fix."""
    recent_ms = now_ms() - 60_000
    routes = {  # device: (fix time of the newest fix applied, arrived)
        "arrived-old": (OLD_MS, True),
        "arrived-recent": (recent_ms, True),
        "driving-old": (OLD_MS, False),
    }
    for device, (applied_ms, ended) in routes.items():
        start = RouteCheckpoint(TENANT, device, "r1", 1, 0, b"S0")
        await history.assign_route(StoredRoute(b"P", start))
        await history.save_route_checkpoints(
            [RouteCheckpoint(TENANT, device, "r1", 1, applied_ms, b"S", ended)]
        )

    purged = await history.purge_before(cutoff_ms(now_ms(), 3))

    assert purged.routes == 1
    kept = await history.routes(TENANT, list(routes))
    assert sorted(r.checkpoint.device for r in kept) == [
        "arrived-recent",
        "driving-old",
    ]
    monitored = await history.monitored_routes()
    assert [r.checkpoint.device for r in monitored] == ["driving-old"]


async def test_a_purge_with_nothing_old_deletes_nothing(history) -> None:
    await history.store(fixes("recent", [now_ms() - 60_000]))
    purged = await history.purge_before(cutoff_ms(now_ms(), 3))
    assert (purged.fixes, purged.partitions, purged.devices) == (0, 0, [])
    assert await history.count(TENANT, "recent") == 1


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    settings = embedded_settings(tmp_path, max_fix_age_s=0.0, default_tenant=TENANT)
    if request.param == "embedded":
        return settings
    return replace(
        settings,
        database_url=request.getfixturevalue("private_pg_url"),
        redis_url=request.getfixturevalue("redis_url"),
        redis_key_prefix=request.getfixturevalue("redis_prefix"),
    )


async def store_old_and_recent(channel: grpc.aio.Channel) -> None:
    """A depot fence; "old" inside it ten days ago (an ENTER event then), "recent"
    inside it now; both stored, and both ENTER events."""
    fence = geofence_pb2.Fence(
        fence_id="depot",
        shape=geofence_pb2.FenceShape(
            circle=common_pb2.Circle(center=DEPOT, radius_m=300)
        ),
    )
    geofence = geofence_pb2_grpc.GeofenceStub(channel)
    await geofence.CreateFence(geofence_pb2.CreateFenceRequest(fence=fence))
    track = track_pb2_grpc.TrackSessionStub(channel)
    old = [fix(s, 60.17, 24.94, time_ms=OLD_MS + s * 1_000) for s in (1, 2)]
    await track_session(track, "old", [old])
    await track_session(track, "recent", [[fix(1, 60.17, 24.94)]])
    async with asyncio.timeout(30):
        while True:
            if await events_of(channel, "old") and await events_of(channel, "recent"):
                break
            await asyncio.sleep(0.01)


async def events_of(channel: grpc.aio.Channel, device: str) -> list:
    request = geofence_pb2.ListEventsRequest(start_ms=0, device_id=device)
    found = await geofence_pb2_grpc.GeofenceStub(channel).ListEvents(request)
    return list(found.events)


async def track_length(channel: grpc.aio.Channel, device: str) -> int:
    request = history_pb2.GetTrackRequest(
        device_id=device, start_ms=OLD_MS - DAY_MS, end_ms=now_ms() + 60_000
    )
    call = history_pb2_grpc.HistoryStub(channel).GetTrack(request)
    return sum([len(part.positions) async for part in call])


async def test_the_server_enforces_retention_from_its_start(
    start_server, settings: Settings
) -> None:
    first = await start_server(settings=settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        await store_old_and_recent(channel)
    if settings.redis_url:  # both ENTER events on the event stream, appended now
        await on_the_stream(settings, {(TENANT, "old"), (TENANT, "recent")})
    await first.stop(0)

    server = await start_server(settings=replace(settings, retention_days=3))
    assert server.retention is not None
    async with asyncio.timeout(30):
        await server.retention.passed.wait()

    assert server.retention.last is not None
    assert server.retention.last.devices == 1
    assert server.retention.last.counts["events"] >= 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        last = await track_pb2_grpc.TrackSessionStub(channel).GetLastPositions(
            track_pb2.GetLastPositionsRequest(device_ids=["old", "recent"])
        )
        assert [p.device_id for p in last.positions] == ["recent"]
        assert await track_length(channel, "old") == 0
        assert await track_length(channel, "recent") == 1
        assert await events_of(channel, "old") == []
        assert len(await events_of(channel, "recent")) >= 1
    if settings.redis_url:  # "old"'s event went by its fix time, not its append
        assert set(await stream_owners(settings)) == {(TENANT, "recent")}
        assert server.retention.last.counts["stream entries"] >= 1


async def test_tracking_purge_deletes_once(
    start_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = embedded_settings(tmp_path, max_fix_age_s=0.0, default_tenant=TENANT)
    server = await start_server(settings=settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await store_old_and_recent(channel)
    await server.stop(0)
    argv = ["purge", "--data-dir", settings.data_dir, "--retention-days", "3"]

    assert await asyncio.to_thread(main, argv) == 0

    assert "devices with nothing left" in capsys.readouterr().out
    store = await SqliteHistoryStore.open(Path(settings.data_dir) / "history.sqlite3")
    try:
        assert await store.count(TENANT, "old") == 0
        assert await store.count(TENANT, "recent") == 1
    finally:
        await store.close()


async def test_tracking_purge_needs_retention_days(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["purge", "--data-dir", str(tmp_path / "data")]
    assert await asyncio.to_thread(main, argv) == 2
    assert "purge needs --retention-days" in capsys.readouterr().err


async def test_tracking_purge_refuses_a_data_dir_without_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "no-such-dir"
    argv = ["purge", "--data-dir", str(typo), "--retention-days", "3"]
    assert await asyncio.to_thread(main, argv) == 2
    assert "no embedded store at" in capsys.readouterr().err
    assert not typo.exists()  # nothing was made there either


@pytest.mark.postgres
async def test_an_arrival_whose_save_fails_during_a_retention_pass_is_kept(
    private_pg_url: str,
) -> None:
    """The save of an arrival waits for a lock another session holds on the
    routes (a migration, say) past the store's lock timeout, and fails; a
    retention pass in the meantime keeps the route in memory, so the next round
    stores it as ended and the next start does not monitor it again."""
    store = await PostgresHistoryStore.open(private_pg_url, pool_timeout_s=0.5)
    keeper = AssignmentKeeper(RouteMonitor(), store, 3600.0)
    keeper.start()
    await keeper.assign(planned("van-1"))
    end = np.array([[60.16, 24.93], [60.17, 24.93]])
    drive = support.fixes("van-1", end, tenant=ROUTE_TENANT)
    async with await psycopg.AsyncConnection.connect(private_pg_url) as locker:
        await locker.execute("LOCK TABLE assigned_routes IN ACCESS EXCLUSIVE MODE")
        events = await keeper.process(drive)  # the arrival's save starts
        async with asyncio.timeout(HANG_S):
            await lock_waited_for(locker)
        kept = await keeper.forget_arrived(now_ms())
        await keeper.stop()  # the arrival's save fails, so does the one at stop
        await locker.rollback()
    saved = await keeper.save_checkpoints()
    forgotten = await keeper.forget_arrived(now_ms())
    stored = await store.routes(ROUTE_TENANT, ["van-1"])
    monitored = await store.monitored_routes()
    await store.close()

    assert [e.type.name for e in events] == ["ARRIVED"]
    assert kept == {KEPT_IN_MEMORY: 0}
    assert saved == 1
    assert forgotten == {KEPT_IN_MEMORY: 1}
    assert stored[0].checkpoint.ended
    assert monitored == []


async def lock_waited_for(conn: psycopg.AsyncConnection) -> None:
    """Until another session waits for a lock (a hang guard bounds it)."""
    for _ in itertools.count():
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
        row = await cur.fetchone()
        if row is not None and row[0]:
            return
        await asyncio.sleep(0.02)
