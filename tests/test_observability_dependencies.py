"""Health checks of PostgreSQL and Redis, against the real servers and a dead port."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import require_service
from tracking_grpc.config import Settings
from tracking_grpc.observability import metrics
from tracking_grpc.observability.dependencies import DependencyMonitor

POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS = "redis://127.0.0.1:6379/0"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def registry():
    yield metrics.enable()
    metrics.disable()


@pytest.mark.postgres
@pytest.mark.redis
async def test_live_dependencies_report_up(registry):
    monitor = DependencyMonitor(Settings(database_url=POSTGRES, redis_url=REDIS))
    try:
        results = await monitor.check()
    finally:
        await monitor.close()
    if not all(results.values()):
        require_service("postgresql/redis", f"health checks failed: {results}")
    assert results == {"postgresql": True, "redis": True}
    up = registry.get_sample_value("tracking_dependency_up", {"dependency": "redis"})
    assert up == 1


async def test_unreachable_dependencies_report_down(registry):
    port = closed_port()
    settings = Settings(
        database_url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
        redis_url=f"redis://127.0.0.1:{port}/0",
    )
    monitor = DependencyMonitor(settings)
    try:
        assert await monitor.check() == {"postgresql": False, "redis": False}
    finally:
        await monitor.close()
    down = {"dependency": "postgresql"}
    assert registry.get_sample_value("tracking_dependency_up", down) == 0
