"""JWT authentication and roles against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tracking.v1 import track_pb2, track_pb2_grpc

from tests.server_fixtures import batch, fix, hello, track_session

SECRET = "test-secret-of-enough-length-for-hs256"


def token(role: str, sub: str = "dev-1", tenant: str = "acme", **extra) -> str:
    claims = {"sub": sub, "tenant": tenant, "role": role, "exp": time.time() + 600}
    return jwt.encode({**claims, **extra}, SECRET, algorithm="HS256")


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


@pytest.fixture
async def secured(start_server):
    server = await start_server(auth_mode="jwt", jwt_hs256_secret=SECRET)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, track_pb2_grpc.TrackSessionStub(channel)


async def test_device_token_publishes_its_own_device(secured) -> None:
    server, stub = secured
    _, acks = await track_session(
        stub, "dev-1", [[fix(1, 1.0, 1.0)]], metadata=bearer(token("device"))
    )
    assert acks[0].stored == 1
    assert await server.app.history.count("acme", "dev-1") == 1
    assert await server.app.history.count("default", "dev-1") == 0


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        pytest.param(None, grpc.StatusCode.UNAUTHENTICATED, id="no-token"),
        pytest.param(bearer("garbage"), grpc.StatusCode.UNAUTHENTICATED, id="garbage"),
        pytest.param(
            bearer(token("device", tenant="a\x00b")),
            grpc.StatusCode.UNAUTHENTICATED,
            id="tenant-with-nul",  # PostgreSQL text cannot hold it
        ),
        pytest.param(
            bearer(token("device", tenant="t" * 257)),
            grpc.StatusCode.UNAUTHENTICATED,
            id="tenant-too-long",
        ),
        pytest.param(
            bearer(token("device", exp=time.time() - 10)),
            grpc.StatusCode.UNAUTHENTICATED,
            id="expired",
        ),
        pytest.param(
            bearer(
                jwt.encode(
                    {
                        "sub": "x",
                        "tenant": "t",
                        "role": "admin",
                        "exp": time.time() + 60,
                    },
                    "other-secret-that-is-long-enough",
                    algorithm="HS256",
                )
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            id="wrong-key",
        ),
        pytest.param(
            bearer(token("device", sub="dev-2")),
            grpc.StatusCode.PERMISSION_DENIED,
            id="other-device",
        ),
    ],
)
async def test_track_refuses_bad_credentials(secured, metadata, code) -> None:
    _, stub = secured
    call = stub.Track(metadata=metadata)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        # Refused once the hello names another device: the server reads it first.
        await call.write(hello("dev-1"))
    # A bad token is refused as the call starts, before anything is read. Writing
    # then races the refusal: a write that fails before the client has the
    # server's status makes grpc-python set the status to INTERNAL ("Internal
    # error from Core"), one run in several on a busy machine.
    assert await call.code() == code


TWO_TOKENS = (
    ("authorization", f"Bearer {token('admin', sub='a', tenant='acme')}"),
    ("authorization", f"Bearer {token('admin', sub='b', tenant='beta')}"),
)
BAD_THEN_GOOD = (
    ("authorization", "Bearer xx"),
    ("authorization", f"Bearer {token('admin', sub='a')}"),
)


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param(TWO_TOKENS, id="two-valid-tokens"),
        pytest.param(BAD_THEN_GOOD, id="bad-then-valid"),
    ],
)
async def test_several_authorization_headers_are_refused(secured, metadata) -> None:
    """Which of several headers counts would depend on the proxies on the way: none
    does, on a unary call as on a stream."""
    _, stub = secured
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetLastPositions(
            track_pb2.GetLastPositionsRequest(device_ids=["dev-1"]),
            metadata=metadata,
        )
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "more than one authorization header" in (raised.value.details() or "")
    call = stub.Track(metadata=metadata)
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "more than one authorization header" in (await call.details() or "")


async def test_device_role_cannot_read_positions(secured) -> None:
    _, stub = secured
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetLastPositions(
            track_pb2.GetLastPositionsRequest(device_ids=["dev-1"]),
            metadata=bearer(token("device")),
        )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_tenants_are_kept_apart(secured) -> None:
    _, stub = secured
    await track_session(
        stub, "dev-1", [[fix(1, 1.0, 1.0)]], metadata=bearer(token("device"))
    )
    request = track_pb2.GetLastPositionsRequest(device_ids=["dev-1"])
    mine = await stub.GetLastPositions(
        request, metadata=bearer(token("viewer", sub="v"))
    )
    theirs = await stub.GetLastPositions(
        request, metadata=bearer(token("viewer", sub="v", tenant="other"))
    )
    assert [p.device_id for p in mine.positions] == ["dev-1"]
    assert list(theirs.missing_device_ids) == ["dev-1"]


async def test_rs256_public_key(start_server, tmp_path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(pem)
    server = await start_server(
        auth_mode="jwt", jwt_rs256_public_key_file=str(tmp_path / "pub.pem")
    )
    claims = {"sub": "v", "tenant": "acme", "role": "viewer", "exp": time.time() + 60}
    signed = jwt.encode(claims, key, algorithm="RS256")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = await track_pb2_grpc.TrackSessionStub(channel).GetLastPositions(
            track_pb2.GetLastPositionsRequest(device_ids=["x"]), metadata=bearer(signed)
        )
    assert list(reply.missing_device_ids) == ["x"]


async def test_viewer_cannot_publish(secured) -> None:
    _, stub = secured
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await track_session(
            stub, "dev-1", [[fix(1, 1.0, 1.0)]], metadata=bearer(token("viewer"))
        )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_stream_ends_when_its_token_expires(secured) -> None:
    server, stub = secured
    short = token("device", exp=time.time() + 1.5)
    call = stub.Track(metadata=bearer(short))
    await call.write(hello("dev-1"))
    await call.read()
    await asyncio.sleep(2)
    with contextlib.suppress(asyncio.InvalidStateError):  # ended by its timer
        await call.write(batch([fix(1, 1.0, 1.0)]))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await server.app.history.count("acme", "dev-1") == 0


async def expires_while_idle(call, wait_s: float = 10.0) -> grpc.StatusCode:
    """The code that ends an idle watch stream; it must end within ``wait_s``."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async with asyncio.timeout(wait_s):
            while True:  # snapshot and any updates, until the stream ends
                await call.read()
    return raised.value.code()


@pytest.mark.parametrize("want_events", [False, True])
async def test_an_idle_track_stream_ends_when_its_token_expires(
    secured, want_events
) -> None:
    """After its acks: a stream that sent a batch and went quiet (with events on, it
    would go on hearing them) ends at expiry, not at its next batch."""
    _, stub = secured
    short = token("device", sub="dev-9", exp=time.time() + 1.5)
    call = stub.Track(metadata=bearer(short))
    await call.write(hello("dev-9", want_events=want_events))
    assert (await call.read()).HasField("started")
    await call.write(batch([fix(1, 1.0, 1.0)]))
    assert (await call.read()).ack.acked_seq == 1
    assert await expires_while_idle(call) == grpc.StatusCode.UNAUTHENTICATED


async def test_watch_ends_when_its_token_expires(secured) -> None:
    _, stub = secured
    short = token("viewer", sub="v", exp=time.time() + 1.5)
    call = stub.Watch(track_pb2.WatchRequest(), metadata=bearer(short))
    assert await expires_while_idle(call) == grpc.StatusCode.UNAUTHENTICATED


def signed(**claims) -> str:
    """A viewer token of ``claims`` (exp included only if given)."""
    base = {"sub": "v", "tenant": "acme", "role": "viewer"}
    return jwt.encode({**base, **claims}, SECRET, algorithm="HS256")


async def last_positions(stub, value: str):
    return await stub.GetLastPositions(
        track_pb2.GetLastPositionsRequest(device_ids=["x"]), metadata=bearer(value)
    )


NOW = time.time()
DAY = 86_400.0


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param({"exp": 1e30}, "max_token_lifetime_s", id="exp-1e30"),
        pytest.param({"exp": 10**400}, "finite", id="exp-beyond-any-float"),
        pytest.param({"exp": float("inf")}, "finite", id="exp-infinite"),
        pytest.param({"exp": float("nan")}, "finite", id="exp-nan"),
        pytest.param({"exp": "2000000000"}, "number", id="exp-text"),
        pytest.param({"exp": True}, "number", id="exp-bool"),
        pytest.param({"exp": NOW + 2 * DAY}, "max_token_lifetime_s", id="exp-2-days"),
        pytest.param(
            {"exp": NOW + 600, "iat": NOW + DAY}, "iat", id="iat-in-the-future"
        ),
        pytest.param({"exp": NOW + 600, "iat": float("inf")}, "finite", id="iat-inf"),
        pytest.param(
            {"exp": NOW + 600, "iat": NOW - 2 * DAY},
            "exp - iat",
            id="issued-for-over-a-day",
        ),
        pytest.param({"exp": NOW + 600, "nbf": NOW + 3_600}, "nbf", id="nbf-later"),
        pytest.param({"exp": NOW + 600, "nbf": 10**400}, "finite", id="nbf-huge"),
    ],
)
async def test_absurd_time_claims_are_refused(secured, claims, reason) -> None:
    _, stub = secured
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await last_positions(stub, signed(**claims))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason in (raised.value.details() or "")


@pytest.mark.parametrize(
    "sub",
    [
        pytest.param("", id="empty"),
        pytest.param("  ", id="blank"),
        pytest.param(7, id="a-number"),
    ],
)
async def test_a_token_without_a_subject_is_refused(secured, sub) -> None:
    _, stub = secured
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await last_positions(stub, signed(sub=sub, exp=NOW + 600))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "sub" in (raised.value.details() or "").lower()


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param({"tenant": 5}, "token tenant claim must be a string", id="tenant"),
        pytest.param(
            {"tenant": ["acme"]}, "token tenant claim must be a string", id="list"
        ),
        pytest.param({"role": 3}, "token role claim must be a string", id="role"),
    ],
)
async def test_a_text_claim_of_another_type_is_refused(secured, claims, reason) -> None:
    _, stub = secured
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await last_positions(stub, signed(exp=NOW + 600, **claims))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason in (raised.value.details() or "")


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"exp": NOW + DAY - 60, "iat": NOW - 30}, id="a-day-issued"),
        pytest.param({"exp": NOW + 600, "iat": NOW + 5, "nbf": NOW + 5}, id="skew"),
        pytest.param({"exp": int(NOW) + 600}, id="integer-exp"),
    ],
)
async def test_sane_time_claims_are_accepted(secured, claims) -> None:
    _, stub = secured
    reply = await last_positions(stub, signed(**claims))
    assert list(reply.missing_device_ids) == ["x"]


async def test_the_longest_lifetime_is_a_setting(start_server) -> None:
    server = await start_server(
        auth_mode="jwt", jwt_hs256_secret=SECRET, max_token_lifetime_s=300.0
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        await last_positions(stub, signed(exp=time.time() + 200))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await last_positions(stub, signed(exp=time.time() + 900))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_stream_of_a_token_near_the_longest_lifetime_keeps_its_timer(
    start_server,
) -> None:
    """Bounded claims leave the expiry timer as it was: a watch of a token valid
    for nearly the whole (here short) maximum lifetime ends at its exp."""
    server = await start_server(
        auth_mode="jwt", jwt_hs256_secret=SECRET, max_token_lifetime_s=2.0
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        short = signed(exp=time.time() + 1.5, iat=time.time())
        call = stub.Watch(track_pb2.WatchRequest(), metadata=bearer(short))
        assert await expires_while_idle(call) == grpc.StatusCode.UNAUTHENTICATED
