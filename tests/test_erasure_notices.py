"""Erasure notices on a standalone Redis and a Redis Cluster: every other process
hears an erasure; the announcing one does not act on its own notice."""

from __future__ import annotations

import asyncio

import pytest

from tracking_grpc.storage.redis_client import Connection
from tracking_grpc.storage.redis_erasure import RedisErasureNotices

pytestmark = pytest.mark.redis


async def test_other_processes_forget_what_one_erased(
    any_redis_url: str, redis_prefix: str
) -> None:
    forgotten: dict[str, list[tuple[str, str]]] = {"a": [], "b": [], "c": []}
    heard = asyncio.Event()

    def process(name: str) -> RedisErasureNotices:
        async def forget(tenant: str, device: str) -> dict[str, int]:
            forgotten[name].append((tenant, device))
            if all(forgotten[n] for n in ("b", "c")):
                heard.set()
            return {}

        return RedisErasureNotices(Connection(any_redis_url), redis_prefix, forget)

    processes = [process(name) for name in forgotten]
    for notices in processes:
        await notices.start()
    try:
        await processes[0].announce("acme", "van-7")
        async with asyncio.timeout(10):
            await heard.wait()
    finally:
        for notices in processes:
            await notices.close()

    assert forgotten == {"a": [], "b": [("acme", "van-7")], "c": [("acme", "van-7")]}
