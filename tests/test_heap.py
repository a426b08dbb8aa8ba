"""Memory given back to the system after a backlog drained.

Freed blocks of a backlog stay in glibc malloc's free lists, and the process keeps
its peak size; once a backlog has been stored and processed, the pipeline calls
``malloc_trim``.
"""

from __future__ import annotations

import asyncio
import platform
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from tracking.v1 import track_pb2_grpc

from tests.test_gateway_congestion import (  # noqa: F401
    HANG_GUARD_S,
    gateway_request,
    outage,
    until,
)
from tracking_grpc import admission, heap

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 100_000  # 1 KB each: above pymalloc's 512 bytes, below malloc's mmap


FREED_AND_RELEASED = f"""
from tracking_grpc import heap
blocks = [bytes(1_024) for _ in range({BLOCKS})]
pin = bytes(1_024)  # above the blocks: freeing them leaves no free top to trim
held = heap.resident_bytes()
del blocks
freed = heap.resident_bytes()
assert heap.release_free_memory()
print(held - freed, freed - heap.resident_bytes(), len(pin))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_freed_heap_memory_is_given_back() -> None:
    """In a process of its own: the test run's other threads allocate too."""
    done = subprocess.run(
        [sys.executable, "-c", FREED_AND_RELEASED],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    still_held, released, _ = (int(n) for n in done.stdout.split())
    assert still_held < BLOCKS * 1_024 / 2  # freed, yet still resident
    assert released > BLOCKS * 1_024 / 2


async def test_memory_is_given_back_once_a_backlog_drained(
    start_server,
    outage,  # noqa: F811
    monkeypatch,
) -> None:
    monkeypatch.setattr(admission, "RELEASE_AFTER_FIXES", 3)
    released = asyncio.Event()
    loop = asyncio.get_running_loop()

    def release() -> bool:  # runs in a worker thread
        loop.call_soon_threadsafe(released.set)
        return True

    monkeypatch.setattr(heap, "release_free_memory", release)
    server = await start_server()
    away = outage(server)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        call = asyncio.ensure_future(stub.PublishBatch(gateway_request("a", "b", "c")))
        await until(lambda: away.tries > 1)
        assert not released.is_set()  # the backlog is still there
        away.end()
        async with asyncio.timeout(HANG_GUARD_S):
            assert (await call).stored == 3
            await released.wait()
