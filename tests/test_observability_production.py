"""Metrics on the production backends: dependency health, and several workers.

``serve --workers 2`` forks two processes sharing the gRPC port; each records into
``PROMETHEUS_MULTIPROC_DIR`` and the supervisor's /metrics sums them. A real
Prometheus scrapes it while devices on several connections publish fixes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import replace

import grpc
import pytest
from prometheus_client.mmap_dict import MmapedDict
from tracking.v1 import track_pb2, track_pb2_grpc

from tests.prometheus_server import PrometheusServer, free_port
from tests.server_fixtures import embedded_settings, fix
from tests.services import ServerProcess, wait_for
from tracking_grpc.observability import metrics

DEVICES = 12
FIXES_PER_DEVICE = 25


@pytest.mark.postgres
@pytest.mark.redis
async def test_dependency_health_is_exported(start_server, tmp_path, production_env):
    settings = embedded_settings(tmp_path, metrics_listen="127.0.0.1:0")
    settings = replace(
        settings,
        database_url=production_env["TRACKING_DATABASE_URL"],
        redis_url=production_env["TRACKING_REDIS_URL"],
        redis_key_prefix=production_env["TRACKING_REDIS_KEY_PREFIX"],
    )
    server = await start_server(settings=settings)
    assert await server.check_dependencies() == dict.fromkeys(
        server.dependencies_up, True
    )
    up = metrics.registry().get_sample_value
    assert up("tracking_dependency_up", {"dependency": "postgres"}) == 1
    assert up("tracking_dependency_up", {"dependency": "redis"}) == 1


async def publish_device(address: str, device: str) -> int:
    """One device on a connection of its own; returns the fixes stored."""
    fixes = [fix(s, 41.15 + s * 1e-4, -8.61) for s in range(1, FIXES_PER_DEVICE + 1)]
    request = track_pb2.PublishBatchRequest(
        devices=[track_pb2.DeviceFixes(device_id=device, fixes=fixes)]
    )
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(address, options=own_connection) as channel:
        answer = await track_pb2_grpc.TrackSessionStub(channel).PublishBatch(request)
    return answer.stored


def accepted_per_process(directory) -> dict[str, float]:
    """Accepted fixes each process wrote to its own file in the multiprocess dir."""
    found = {}
    for path in directory.glob("counter_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))
        found[path.stem] = sum(
            value
            for key, value, *_ in values
            if json.loads(key)[1] == "tracking_fixes_accepted_total"
        )
    return {pid: value for pid, value in found.items() if value}


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_two_workers_are_scraped_as_one_sum(production_env, tmp_path):
    multiproc = tmp_path / "multiproc"
    metrics_port = free_port()
    env = {
        **production_env,
        "TRACKING_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        metrics.MULTIPROC_ENV: str(multiproc),
    }
    server = ServerProcess(env, workers=2)
    await asyncio.to_thread(server.start)
    try:
        both = lambda: server.log().count("listening on") >= 2  # noqa: E731
        await asyncio.to_thread(wait_for, both, 30, "both workers listening")
        with PrometheusServer(tmp_path, [f"127.0.0.1:{metrics_port}"]) as prometheus:
            devices = [f"obs-{uuid.uuid4().hex[:8]}" for _ in range(DEVICES)]
            stored = await asyncio.gather(
                *(publish_device(server.address, d) for d in devices)
            )
            query = "sum(tracking_fixes_accepted_total)"
            scraped = await asyncio.to_thread(
                prometheus.wait_for, query, float(sum(stored))
            )
        per_process = accepted_per_process(multiproc)
    finally:
        await asyncio.to_thread(server.stop)
    assert sum(stored) == DEVICES * FIXES_PER_DEVICE
    assert scraped == sum(stored)
    assert len(per_process) == 2, per_process
