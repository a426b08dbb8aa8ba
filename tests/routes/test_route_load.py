"""The start's load of assigned routes on a real PostgreSQL: a few thousand routes
are read in pages, a page that fails is read again, and a route call made while
the load is held up waits for it (up to its deadline, counting the time spent
before, planning the route) instead of failing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from tracking.v1 import route_pb2, route_pb2_grpc

from tests.routes.test_assignments import TENANT, planned
from tests.routes.test_route_rpc import KAMPPI, SENATE
from tests.server_fixtures import StartServer
from tracking_grpc.errors import StorageUnavailable
from tracking_grpc.routing import assignments
from tracking_grpc.routing.assignments import AssignmentKeeper, pack_plan
from tracking_grpc.routing.monitor import RouteMonitor
from tracking_grpc.routing.service import Routing
from tracking_grpc.storage.base import RouteCheckpoint, StoredRoute, route_row
from tracking_grpc.storage.postgres import ASSIGN_ROUTE, PostgresHistoryStore

pytestmark = pytest.mark.postgres

ROUTES = 3_001
PAGE = 250
HANG_S = 60  # a hang guard, not a timing
PLAN_S = 1.5  # the planning of a slow AssignRoute


async def store_routes(url: str, devices: list[str]) -> None:
    """Routes as AssignRoute stores them (no fix applied yet), in one batch."""
    plan = pack_plan(planned("any"))
    rows = [
        route_row(StoredRoute(plan, RouteCheckpoint(TENANT, d, "r1", 1, 0, b"S0")))
        for d in devices
    ]
    async with await psycopg.AsyncConnection.connect(url) as conn:
        async with conn.cursor() as cur:
            await cur.executemany(ASSIGN_ROUTE, rows)


class PageCounter:
    """The real store, with each page of the load recorded; the third page's
    first read fails as an unavailable store would (an outage of exactly one
    read cannot be brought about on the real server at the right moment)."""

    def __init__(self, store: PostgresHistoryStore) -> None:
        self.store = store
        self.pages: list[int] = []  # routes in each page read
        self.failed = 0

    async def monitored_routes(
        self, after: tuple[str, str] | None = None, limit: int | None = None
    ) -> list[StoredRoute]:
        if len(self.pages) == 2 and not self.failed:
            self.failed += 1
            raise StorageUnavailable("PostgreSQL unavailable: connection lost")
        page = await self.store.monitored_routes(after, limit)
        self.pages.append(len(page))
        return page

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_the_load_reads_pages_and_reads_a_failed_one_again(
    private_pg_url: str,
) -> None:
    devices = [f"van-{i:05d}" for i in range(ROUTES)]
    await store_routes(private_pg_url, devices)
    store = await PostgresHistoryStore.open(private_pg_url)
    counter = PageCounter(store)
    history: Any = counter  # the store's route calls, counted
    keeper = AssignmentKeeper(RouteMonitor(), history, 3600.0, load_page=PAGE)

    keeper.start()
    async with asyncio.timeout(HANG_S):
        progress = await keeper.progress(TENANT, devices[-1])  # waits for the load
    await keeper.stop()
    await store.close()

    assert progress is not None and progress.route_id == "r1"
    assert len(keeper.monitor) == ROUTES
    assert counter.pages == [PAGE] * (ROUTES // PAGE) + [ROUTES % PAGE]
    assert counter.failed == 1


async def test_a_route_call_waits_for_a_load_held_up_past_the_store_timeout(
    private_pg_url: str, start_server: StartServer
) -> None:
    """The load's read waits for a lock that another session holds on the table
    (a migration, say) longer than ``database_timeout_s``, and fails; it is read
    again once the lock is gone. A call made meanwhile answers then."""
    await store_routes(private_pg_url, ["van-1"])
    async with await psycopg.AsyncConnection.connect(private_pg_url) as locker:
        await locker.execute("LOCK TABLE assigned_routes IN ACCESS EXCLUSIVE MODE")
        server = await start_server(
            database_url=private_pg_url,
            database_timeout_s=0.3,
            default_tenant=TENANT,
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        call = route_pb2_grpc.RouteStub(channel).GetRouteProgress(
            route_pb2.GetRouteProgressRequest(device_id="van-1"), timeout=HANG_S
        )
        answering = asyncio.ensure_future(call)
        await asyncio.wait({answering}, timeout=1.0)  # past the store's timeout
        assert not answering.done(), "the call did not wait for the load"
        await locker.rollback()
        answer = await answering
    await channel.close()
    assert answer.progress.route_id == "r1"


async def test_an_assignment_planned_slowly_answers_unavailable_before_its_deadline(
    private_pg_url: str,
    start_server: StartServer,
    helsinki_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the load is held up (a lock, as above), an AssignRoute whose plan
    takes most of its deadline still gets the documented UNAVAILABLE ("still
    loading... retry") before that deadline, not DEADLINE_EXCEEDED: the wait for
    the load counts the time spent planning. A plan that slow (a large region on
    a busy machine) cannot be brought about on the test's small extract, so a
    pause is put in front of the real planning; the margin before the deadline
    is widened so that a busy test machine still answers in time."""
    plan = Routing.route

    async def slow_route(self: Routing, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(PLAN_S)
        return await plan(self, *args, **kwargs)

    monkeypatch.setattr(Routing, "route", slow_route)
    monkeypatch.setattr(assignments, "DEADLINE_MARGIN_S", 0.5)
    async with await psycopg.AsyncConnection.connect(private_pg_url) as locker:
        await locker.execute("LOCK TABLE assigned_routes IN ACCESS EXCLUSIVE MODE")
        server = await start_server(
            database_url=private_pg_url,
            database_timeout_s=0.3,
            default_tenant=TENANT,
            routing_data_dir=str(helsinki_dir),
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = route_pb2.AssignRouteRequest(
                device_id="van-1",
                route=route_pb2.ComputeRouteRequest(origin=KAMPPI, destination=SENATE),
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await route_pb2_grpc.RouteStub(channel).AssignRoute(
                    request, timeout=PLAN_S + 1.5
                )
        await locker.rollback()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert "still loading" in (caught.value.details() or "")
