"""Tenants whose names differ only in braces, parentheses or escapes stay apart in
the live store: in the Redis key names and through the RPCs of a real server."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest
from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc

from tests.server_fixtures import fix, now_ms, track_session
from tests.test_auth import SECRET, bearer, token
from tracking_grpc.storage import redis_keys as keys

TRICKY = ["acme", "{acme}", "(acme)", "a{b", "a%7Bb", "a%257Bb", "a}b", "a%7Db", "%"]

PAIRS = [
    pytest.param("{acme}", "(acme)", id="braces-vs-parentheses"),
    pytest.param("a{b", "a%7Bb", id="brace-vs-its-escape"),
]


def test_tag_is_injective_and_brace_free() -> None:
    tags = [keys.tag(tenant) for tenant in TRICKY]
    assert len(set(tags)) == len(TRICKY)
    assert not any("{" in t or "}" in t for t in tags)
    assert keys.tag("acme-1:x") == "acme-1:x"  # ordinary names keep their keys


@pytest.mark.parametrize(("one", "other"), list(itertools.combinations(TRICKY, 2)))
def test_no_two_tenants_share_a_key(one: str, other: str) -> None:
    for name in ("live_key", "live_time_key", "geo_key", "geo_time_key"):
        build = getattr(keys, name)
        assert build("p:", one, 3) != build("p:", other, 3)
    assert keys.cells_key("p:", one) != keys.cells_key("p:", other)


@pytest.fixture(params=["redis", "embedded"])
async def stub(request, start_server):
    """A JWT-secured server whose live store is Redis, or the in-process one."""
    live = {}
    if request.param == "redis":
        live = {
            "redis_url": request.getfixturevalue("redis_url"),
            "redis_key_prefix": request.getfixturevalue("redis_prefix"),
        }
    server = await start_server(auth_mode="jwt", jwt_hs256_secret=SECRET, **live)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield track_pb2_grpc.TrackSessionStub(channel)


async def publish(stub, tenant: str, lat: float, seq: int = 1) -> None:
    metadata = bearer(token("device", sub="dev-1", tenant=tenant))
    when = now_ms() - 10_000 + seq
    await track_session(stub, "dev-1", [[fix(seq, lat, lat, when)]], metadata)


def viewer(tenant: str) -> tuple[tuple[str, str], ...]:
    return bearer(token("viewer", sub="v", tenant=tenant))


async def snapshot(call: grpc.aio.UnaryStreamCall) -> list[float]:
    lats = []
    response = await asyncio.wait_for(call.read(), 10)
    while not response.snapshot_done:
        lats += [p.lat for p in response.positions]
        response = await asyncio.wait_for(call.read(), 10)
    return lats


@pytest.mark.parametrize(("one", "other"), PAIRS)
async def test_tenants_read_only_their_own_positions(stub, one, other) -> None:
    await publish(stub, one, 10.0)
    await publish(stub, other, 20.0)
    for tenant, lat in ((one, 10.0), (other, 20.0)):
        last = await stub.GetLastPositions(
            track_pb2.GetLastPositionsRequest(device_ids=["dev-1"]),
            metadata=viewer(tenant),
        )
        assert [p.lat for p in last.positions] == [lat]
        near = await stub.Nearby(
            track_pb2.NearbyRequest(
                center=common_pb2.LatLng(lat=lat, lon=lat), radius_m=1000.0
            ),
            metadata=viewer(tenant),
        )
        assert [d.position.lat for d in near.devices] == [lat]


@pytest.mark.parametrize(("one", "other"), PAIRS)
async def test_watchers_see_only_their_own_tenant(stub, one, other) -> None:
    await publish(stub, one, 10.0)
    await publish(stub, other, 20.0)
    call = stub.Watch(track_pb2.WatchRequest(), metadata=viewer(one))
    assert await snapshot(call) == [10.0]
    await publish(stub, other, 21.0, seq=2)
    await publish(stub, one, 11.0, seq=2)
    update = await asyncio.wait_for(call.read(), 10)
    assert [p.lat for p in update.positions] == [11.0]
    call.cancel()
