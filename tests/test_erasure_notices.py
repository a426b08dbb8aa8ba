"""Erasure notices on a standalone Redis and a Redis Cluster: every other process
hears an erasure, also one whose connection broke meanwhile; the announcing one does
not act on its own notice, a new one not on notices older than itself."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from tracking_grpc.geofence.stream_trim import EventStreamTrimmer
from tracking_grpc.servicers.geofence import GEOFENCE_STREAM
from tracking_grpc.storage.redis_client import TIMEOUTS, Connection
from tracking_grpc.storage.redis_notices import BLOCK_MS, STREAM, RedisDeviceNotices

pytestmark = pytest.mark.redis


async def test_other_processes_forget_what_one_erased(
    any_redis_url: str, redis_prefix: str
) -> None:
    forgotten: dict[str, list[tuple[str, str]]] = {"a": [], "b": [], "c": []}
    heard = asyncio.Event()

    def process(name: str) -> RedisDeviceNotices:
        async def forget(tenant: str, device: str) -> dict[str, int]:
            forgotten[name].append((tenant, device))
            if all(forgotten[n] for n in ("b", "c")):
                heard.set()
            return {}

        return RedisDeviceNotices(Connection(any_redis_url), redis_prefix, forget)

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


async def test_a_notice_of_a_kind_goes_to_that_kinds_handler(
    any_redis_url: str, redis_prefix: str
) -> None:
    plain: list[tuple[str, str]] = []
    held: list[tuple[str, str]] = []

    async def record_held(tenant: str, device: str) -> dict[str, int]:
        held.append((tenant, device))
        return {}

    hearing = listener(any_redis_url, redis_prefix, plain)
    hearing.others = {"held": record_held}
    telling = listener(any_redis_url, redis_prefix, [])
    for notices in (hearing, telling):
        await notices.start()
    try:
        await telling.announce("acme", "van-1", "held")
        await telling.announce("acme", "van-2", "unknown")  # dropped, logged
        await telling.announce("acme", "van-3")
        await until_heard(plain, "van-3")
    finally:
        for notices in (hearing, telling):
            await notices.close()

    assert (plain, held) == ([("acme", "van-3")], [("acme", "van-1")])


def listener(
    url: str, prefix: str, heard: list[tuple[str, str]], name: str | None = None
) -> RedisDeviceNotices:
    """A process's notices whose forgetting is recorded in ``heard``."""

    async def forget(tenant: str, device: str) -> dict[str, int]:
        heard.append((tenant, device))
        return {}

    return RedisDeviceNotices(Connection(url, name=name), prefix, forget)


async def until_heard(heard: list[tuple[str, str]], device: str) -> None:
    async with asyncio.timeout(10):
        while ("acme", device) not in heard:  # noqa: ASYNC110 - a task fills it
            await asyncio.sleep(0.02)


def node_urls(url: str) -> list[str]:
    """Every node of the Redis at ``url``: itself, or each node of its cluster."""
    client = redis.Redis.from_url(url)
    try:
        if not client.info("cluster").get("cluster_enabled"):
            return [url]
        nodes = client.execute_command("CLUSTER NODES")  # by "host:port@bus"
    finally:
        client.close()
    return [f"redis://{address.split('@')[0]}" for address in nodes]


def kill_connections(url: str, name: str) -> int:
    """CLIENT KILL ID every connection named ``name`` (only those); how many."""
    killed = 0
    for node in node_urls(url):
        client = redis.Redis.from_url(node)
        try:
            for connection in client.client_list():
                if connection.get("name") == name:
                    client.client_kill_filter(_id=connection["id"])
                    killed += 1
        finally:
            client.close()
    return killed


def announce_elsewhere(url: str, prefix: str, device: str) -> None:
    """Announce from another process: a thread with an event loop of its own, so
    that the caller's loop (and its listeners) stands still until it is done."""

    async def announce() -> None:
        notices = listener(url, prefix, [])
        try:
            await notices.announce("acme", device)
        finally:
            await notices.close()

    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, announce()).result()


async def test_a_broken_connection_misses_no_notice(
    any_redis_url: str, redis_prefix: str
) -> None:
    heard: list[tuple[str, str]] = []
    name = f"{redis_prefix}listener"
    notices = listener(any_redis_url, redis_prefix, heard, name)
    await notices.start()
    try:
        announce_elsewhere(any_redis_url, redis_prefix, "van-1")
        await until_heard(heard, "van-1")

        assert kill_connections(any_redis_url, name) >= 1
        announce_elsewhere(any_redis_url, redis_prefix, "van-2")  # while cut off
        await until_heard(heard, "van-2")
    finally:
        await notices.close()

    assert heard == [("acme", "van-1"), ("acme", "van-2")]


async def test_a_new_process_ignores_notices_older_than_itself(
    any_redis_url: str, redis_prefix: str
) -> None:
    announce_elsewhere(any_redis_url, redis_prefix, "van-old")
    heard: list[tuple[str, str]] = []
    notices = listener(any_redis_url, redis_prefix, heard)
    await notices.start()
    try:
        announce_elsewhere(any_redis_url, redis_prefix, "van-new")
        await until_heard(heard, "van-new")
    finally:
        await notices.close()

    assert heard == [("acme", "van-new")]


async def test_a_stream_behind_the_last_notice_is_read_from_its_start(
    any_redis_url: str, redis_prefix: str
) -> None:
    heard: list[tuple[str, str]] = []
    notices = listener(any_redis_url, redis_prefix, heard)
    await notices.start()
    try:
        announce_elsewhere(any_redis_url, redis_prefix, "van-1")
        await until_heard(heard, "van-1")

        # Redis lost the stream; the new one's clock is behind this reader's.
        client = await notices.connection.get()
        await client.delete(notices.stream)
        notice: dict[Any, Any] = {
            "process": "elsewhere",
            "tenant": "acme",
            "device": "van-2",
        }
        await client.xadd(notices.stream, notice, id="1-1")
        await until_heard(heard, "van-2")
    finally:
        await notices.close()

    assert heard == [("acme", "van-1"), ("acme", "van-2")]


async def test_retention_and_erasure_leave_the_notices_alone(
    any_redis_url: str, redis_prefix: str
) -> None:
    announce_elsewhere(any_redis_url, redis_prefix, "van-7")
    connection = Connection(any_redis_url)
    trimmer = EventStreamTrimmer(connection, redis_prefix + GEOFENCE_STREAM)
    try:
        await trimmer.erase_device("acme", "van-7")
        await trimmer.purge_before(time.time_ns())
        client = await connection.get()
        kept = await client.xlen(redis_prefix + STREAM)
    finally:
        await connection.close()

    assert kept == 1


def test_a_read_waits_less_than_the_socket_timeout() -> None:
    assert BLOCK_MS / 1000 < TIMEOUTS["socket_timeout"]


async def test_only_trimmed_notices_are_warned_about(
    any_redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    notices = listener(any_redis_url, redis_prefix, [])
    client = await notices.connection.get()
    notice = {"process": "elsewhere", "tenant": "acme", "device": "van-3"}
    try:
        # A stream made anew (Redis lost its data): later than the last notice
        # read, but nothing was trimmed from it.
        notices.last_id = "1000-0"
        await client.xadd(notices.stream, notice, id="2000-0")
        with caplog.at_level(logging.WARNING):
            await notices._position(client, resumed=True)
        assert "trimmed" not in caplog.text

        # Notices after the last one read were trimmed before it was back.
        await client.xadd(notices.stream, notice, id="3000-0")
        await client.xtrim(notices.stream, maxlen=1, approximate=False)
        with caplog.at_level(logging.WARNING):
            await notices._position(client, resumed=True)
        assert "trimmed" in caplog.text
    finally:
        await client.delete(notices.stream)
        await notices.connection.close()
