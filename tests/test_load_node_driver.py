"""The load tool's Node.js device driver against a real server: tokens and errors.

The end-to-end runs (counts, verify, storm) are in tests/test_load_smoke.py; these
drive ``bench/node_driver`` directly with a small :class:`Plan` against an
in-process server that requires JWT bearer tokens.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace

import jwt
import pytest

from tests.conftest import require_service
from tracking_grpc.loadgen.node import NodeDriver, NodeDriverError, check_installed
from tracking_grpc.loadgen.plan import DriverResult, Plan, Window

SECRET = "node-driver-secret-of-enough-length-for-hs256"


@pytest.fixture(autouse=True)
def node_driver_installed() -> None:
    try:
        check_installed()
    except NodeDriverError as exc:
        require_service("node device driver", str(exc))


def token(role: str, tenant: str = "acme") -> str:
    claims = {"sub": "fleet-ops", "tenant": tenant, "role": role}
    return jwt.encode({**claims, "exp": time.time() + 600}, SECRET, algorithm="HS256")


def small_plan(port: int, tenant_token: str, devices: int) -> Plan:
    window = Window(time.time() + 1.0, ramp_s=0.5, steady_s=2.0)
    return Plan(
        target=f"127.0.0.1:{port}",
        window=window,
        devices=devices,
        device_interval_s=0.5,
        tenant_token=tenant_token,
    )


async def run_node(plan: Plan) -> DriverResult:
    driver = NodeDriver(plan)
    try:
        return await asyncio.to_thread(driver.result, 60.0)
    finally:
        driver.kill()


async def secured(start_server):
    return await start_server(auth_mode="jwt", jwt_hs256_secret=SECRET)


async def test_fixes_are_stored_under_the_tokens_tenant(start_server) -> None:
    server = await secured(start_server)
    result = await run_node(small_plan(server.port, token("admin"), devices=20))
    assert result.errors == {}
    assert [d for d, _, _ in sorted(result.generated)][:2] == [
        "load-00-000000",
        "load-00-000001",
    ]
    for device, generated, acked in result.generated:
        assert generated == acked > 0
        assert await server.app.history.count("acme", device) == generated
        assert await server.app.history.count("default", device) == 0
    assert result.counts["fixes_stored"] == result.counts["fixes_generated"]


async def test_a_refused_token_is_counted_and_retried(start_server) -> None:
    server = await secured(start_server)
    result = await run_node(small_plan(server.port, "not-a-token", devices=2))
    # Each device tries once and retries up to five times with a growing back-off.
    assert list(result.errors) == ["track_UNAUTHENTICATED"]
    assert 2 <= result.errors["track_UNAUTHENTICATED"] <= 2 * 6
    assert result.error_details["track_UNAUTHENTICATED"].startswith("first at ")
    assert "streams_opened" not in result.counts and result.ack_ms == []
    assert sorted(n > 0 and acked == 0 for _, n, acked in result.generated) == [
        True,
        True,
    ]


def threads(pid: int) -> list[str]:
    return os.listdir(f"/proc/{pid}/task")


async def test_the_driver_and_its_threads_keep_to_the_cpus_named(start_server) -> None:
    """``--driver-cpus``: the node process and every thread it starts (V8's
    garbage-collector helpers among them) run only on the CPUs given."""
    server = await secured(start_server)
    cpus = {min(os.sched_getaffinity(0))}
    plan = replace(small_plan(server.port, token("admin"), 5), cpus=tuple(cpus))
    driver = NodeDriver(plan)
    try:
        await asyncio.sleep(1.0)  # node has started its threads
        masks = {frozenset(os.sched_getaffinity(int(t))) for t in threads(driver.pid)}
        result = await asyncio.to_thread(driver.result, 60.0)
    finally:
        driver.kill()
    assert masks == {frozenset(cpus)}
    assert result.counts["fixes_sent"] > 0
