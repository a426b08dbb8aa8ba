"""Watchers of the process that stored a fix get it before its live write to Redis.

With a shared live store every commit's newest positions take a round trip to Redis
(the newer-only check) before they are published. This process's own watchers are
offered them before that write instead; a watcher added while the write is under
way still gets them once it lands (its snapshot may have missed them), and without
such a watcher they are not offered twice. Each test holds the live write back at a
gate, on a real server with PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from tracking.v1 import track_pb2, track_pb2_grpc

from tests.backends import backend_settings
from tests.server_fixtures import embedded_settings, fix, now_ms
from tracking_grpc.server import TrackingServer

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


class Gate:
    """Holds every live write of a server until opened."""

    def __init__(self, server: TrackingServer) -> None:
        self.entered = asyncio.Event()
        self.open = asyncio.Event()
        live = server.app.live
        write = live.update

        async def gated(batch):
            self.entered.set()
            await self.open.wait()
            return await write(batch)

        live.update = gated  # type: ignore[method-assign]


@pytest.fixture(params=["postgres-redis"])
async def served(
    request: pytest.FixtureRequest, start_server, tmp_path: Path
) -> AsyncIterator[tuple[TrackingServer, track_pb2_grpc.TrackSessionStub]]:
    settings = backend_settings(request, embedded_settings(tmp_path))
    server = await start_server(settings=settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, track_pb2_grpc.TrackSessionStub(channel)


@pytest.fixture
async def gate(served) -> AsyncIterator[Gate]:
    """The served server's gate, opened at the end whatever happened (a server
    cannot stop while a live write waits)."""
    held = Gate(served[0])
    yield held
    held.open.set()


async def watch(stub, device: str):
    """A watch of the device, past its (empty) snapshot."""
    call = stub.Watch(track_pb2.WatchRequest(device_ids=[device]))
    async with asyncio.timeout(10):
        while not (await call.read()).snapshot_done:
            pass
    return call


async def store(stub, device: str, seq: int) -> None:
    fixes = [fix(seq, 60.17, 24.94, now_ms() - 1_000 + seq)]
    request = track_pb2.PublishBatchRequest(
        devices=[track_pb2.DeviceFixes(device_id=device, fixes=fixes)]
    )
    answer = await stub.PublishBatch(request)
    assert answer.stored == 1


async def next_seqs(call, timeout_s: float = 5.0) -> list[int]:
    async with asyncio.timeout(timeout_s):
        return [p.seq for p in (await call.read()).positions]


async def test_a_watcher_gets_a_fix_before_its_live_write(served, gate) -> None:
    _, stub = served
    device = f"car-{uuid.uuid4().hex[:8]}"
    watcher = await watch(stub, device)

    await store(stub, device, 1)
    await asyncio.wait_for(gate.entered.wait(), 5)

    assert await next_seqs(watcher) == [1]
    assert not gate.open.is_set()
    gate.open.set()
    watcher.cancel()


async def test_a_watcher_added_during_the_live_write_still_gets_the_fix(
    served, gate
) -> None:
    _, stub = served
    device = f"car-{uuid.uuid4().hex[:8]}"
    first = await watch(stub, device)
    await store(stub, device, 1)
    await asyncio.wait_for(gate.entered.wait(), 5)
    assert await next_seqs(first) == [1]

    late = await watch(stub, device)  # its snapshot misses the unwritten fix
    gate.open.set()

    assert await next_seqs(late) == [1]
    first.cancel()
    late.cancel()


async def test_without_a_new_watcher_a_fix_is_offered_once(served) -> None:
    server, stub = served
    device = f"car-{uuid.uuid4().hex[:8]}"
    call = await watch(stub, device)
    (watcher,) = [w for w in server.app.hub.watchers_of("default") if w.filter.devices]
    offered: list[list[int]] = []
    offer = watcher.offer

    def counted(batch) -> None:
        offered.append(batch.seq.tolist())
        offer(batch)

    watcher.offer = counted  # type: ignore[method-assign]

    await store(stub, device, 1)
    assert await next_seqs(call) == [1]
    await store(stub, device, 2)
    assert await next_seqs(call) == [2]
    await asyncio.sleep(0.2)  # a second offer would come after the live write

    assert offered == [[1], [2]]
    call.cancel()
