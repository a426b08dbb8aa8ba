"""Several server processes on the production backends, as on several machines.

A device streams into one process while a watcher on another sees every update; the
first process is killed mid-stream and the device resumes on the second from its last
stored seq: the database ends with every fix exactly once. A killed process's watch
interest expires, so updates stop being sent to it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import grpc
import psycopg
import pytest
from tracking.v1 import track_pb2, track_pb2_grpc

from tests.server_fixtures import batch, fix, hello, now_ms
from tests.services import ServerProcess
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.storage.redis_broker import RedisBroker

pytestmark = pytest.mark.slow


@pytest.fixture
def servers(production_env):
    started: list[ServerProcess] = []

    def start(workers: int = 1, **env: str) -> ServerProcess:
        server = ServerProcess({**production_env, **env}, workers=workers)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


def stored_seqs(url: str, device: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT seq FROM fixes WHERE device = %s ORDER BY seq", [device]
        ).fetchall()
    return [seq for (seq,) in rows]


class WatchLog:
    """Positions a Watch stream delivered, by seq, filled by a background task."""

    def __init__(self, stub: track_pb2_grpc.TrackSessionStub, device: str) -> None:
        self.call = stub.Watch(track_pb2.WatchRequest(device_ids=[device]))
        self.seqs: list[int] = []
        self.ready = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            if response.snapshot_done:
                self.ready.set()
            if not response.snapshot:
                self.seqs += [p.seq for p in response.positions]

    async def saw(self, seq: int, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while seq not in self.seqs:  # noqa: ASYNC110 - filled by the reader task
                await asyncio.sleep(0.01)

    def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


async def test_device_resumes_on_another_process_after_a_crash(servers, pg_url):
    first, second = servers(), servers()
    device = f"bus-{uuid.uuid4().hex[:8]}"
    t0 = now_ms() - 120_000
    fixes = [fix(s, 51.5 + s * 1e-4, -0.1, time_ms=t0 + s * 1000) for s in range(1, 41)]
    async with (
        grpc.aio.insecure_channel(first.address) as to_first,
        grpc.aio.insecure_channel(second.address) as to_second,
    ):
        watcher = WatchLog(track_pb2_grpc.TrackSessionStub(to_second), device)
        await asyncio.wait_for(watcher.ready.wait(), 10)
        call = track_pb2_grpc.TrackSessionStub(to_first).Track()
        await call.write(hello(device))
        assert (await call.read()).started.last_stored_seq == 0
        for f in fixes[
            :20
        ]:  # one at a time: the watcher on the other process sees each
            await call.write(batch([f]))
            assert (await call.read()).ack.acked_seq == f.seq
            await watcher.saw(f.seq)
        for f in fixes[20:25]:  # in flight when the process dies: no ack read
            await call.write(batch([f]))
        first.kill()

        resumed = track_pb2_grpc.TrackSessionStub(to_second).Track()
        await resumed.write(hello(device, resume_from_seq=21))
        last_stored = (await resumed.read()).started.last_stored_seq
        assert 20 <= last_stored <= 25
        for start in range(20, 40, 5):  # resend everything not acked, in batches
            await resumed.write(batch(fixes[start : start + 5]))
            ack = (await resumed.read()).ack
            assert ack.acked_seq == start + 5 and not ack.rejections
        await resumed.done_writing()
        await watcher.saw(40)
        watcher.close()
    assert stored_seqs(pg_url, device) == list(range(1, 41))
    assert watcher.seqs == sorted(watcher.seqs)  # the live position never went back


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


async def test_workers_share_one_port(servers, pg_url) -> None:
    server = servers(workers=2)
    assert len(children(server.process.pid)) == 2
    devices = [f"van-{uuid.uuid4().hex[:8]}" for _ in range(8)]
    t0 = now_ms() - 60_000
    for device in devices:  # a connection each: the kernel spreads them over workers
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = track_pb2_grpc.TrackSessionStub(channel).Track()
            await call.write(hello(device))
            await call.read()
            await call.write(batch([fix(s, 48.1, 11.5, t0 + s) for s in (1, 2, 3)]))
            assert (await call.read()).ack.acked_seq == 3
            await call.done_writing()
    assert all(stored_seqs(pg_url, d) == [1, 2, 3] for d in devices)
    os.kill(server.process.pid, 15)
    assert server.process.wait(timeout=20) == 0, server.log()[-3000:]


async def test_a_worker_that_dies_is_replaced(servers, pg_url) -> None:
    """The others go on serving, the supervisor starts another worker in its
    place, and a stop still ends them all cleanly."""
    server = servers(workers=2)
    first = children(server.process.pid)
    os.kill(first[0], 9)

    def replaced() -> bool:
        now = children(server.process.pid)
        return len(now) == 2 and first[0] not in now and first[1] in now

    async with asyncio.timeout(30):  # the survivor keeps serving meanwhile
        while not replaced():  # noqa: ASYNC110 - polls another process's children
            await asyncio.sleep(0.1)
    device, t0 = f"tram-{uuid.uuid4().hex[:8]}", now_ms() - 60_000
    for seq in (1, 2, 3, 4):  # a connection each: the kernel spreads them
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = track_pb2_grpc.TrackSessionStub(channel).Track()
            await call.write(hello(device))
            await call.read()
            await call.write(batch([fix(seq, 48.1, 11.5, t0 + seq)]))
            assert (await call.read()).ack.acked_seq == seq
            await call.done_writing()
    assert stored_seqs(pg_url, device) == [1, 2, 3, 4]
    assert "replaced by pid" in server.log()
    os.kill(server.process.pid, 15)
    assert server.process.wait(timeout=20) == 0, server.log()[-3000:]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead and not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_workers_die_with_a_killed_supervisor(servers) -> None:
    """A supervisor killed outright forwards nothing: its workers must not go on
    serving on their own."""
    server = servers(workers=2)
    workers = children(server.process.pid)
    assert len(workers) == 2
    server.kill()
    try:
        async with asyncio.timeout(60):  # hang guard: they stop within their grace
            while any(alive(pid) for pid in workers):  # noqa: ASYNC110 - polls /proc
                await asyncio.sleep(0.1)
    finally:
        for pid in workers:  # without the death signal they would serve on
            if alive(pid):
                os.kill(pid, 9)


async def test_a_stop_kills_a_worker_that_does_not_exit(servers) -> None:
    """A worker that cannot stop (here: stopped with SIGSTOP) is killed once
    KILL_AFTER_S have passed since the stop was forwarded; the supervisor exits
    instead of waiting for it forever."""
    server = servers(workers=2)
    workers = children(server.process.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGSTOP)
    server.process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(60):  # hang guard: KILL_AFTER_S is 15 s
            while server.process.poll() is None:  # noqa: ASYNC110 - polls a child
                await asyncio.sleep(0.1)
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not any(alive(pid) for pid in workers)


async def test_a_killed_process_stops_being_sent_updates(
    servers, production_env, redis_url, redis_prefix
) -> None:
    """Its watch interest expires after the TTL; a live process's heartbeat
    removes it, and publishers stop routing to it."""
    watching = servers(TRACKING_FANOUT_INTEREST_TTL_S="1")
    survivor = await RedisBroker.open(redis_url, redis_prefix, interest_ttl_s=1.0)
    await survivor.subscribe(_ignore, dict)
    device = f"kite-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(watching.address) as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        call = stub.Watch(track_pb2.WatchRequest(device_ids=[device]))
        while not (await call.read()).snapshot_done:
            pass
        _, entries = await survivor.table.read({})
        assert len(entries) == 1 and "default" in next(iter(entries.values()))[1]
        watching.kill()
    async with asyncio.timeout(20):
        while (await survivor.table.read({}))[1]:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    batch = FixBatch.from_rows("default", [(device, 1, now_ms(), 1.0, 1.0)])
    await survivor.publish(batch)
    assert "default" not in survivor._routes
    await survivor.close()


async def _ignore(batch: FixBatch) -> None:
    return None
