"""Which settings ``serve --workers N`` accepts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tracking_grpc.config import Settings
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.workers import check_workers

SHARED = {"database_url": "postgresql://127.0.0.1/x", "redis_url": "redis://127.0.0.1"}


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        pytest.param(Settings(workers=2), "workers", id="embedded-store"),
        pytest.param(
            Settings(workers=2, listen="127.0.0.1:0", **SHARED), "listen", id="port-0"
        ),
        pytest.param(Settings(workers=0), "workers", id="zero"),
    ],
)
def test_refused(settings: Settings, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_workers(settings)
    assert raised.value.field == field


def test_shared_backends_on_a_fixed_port_are_accepted() -> None:
    check_workers(Settings(workers=4, listen="127.0.0.1:50051", **SHARED))


def _serve(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tracking_grpc", "serve", *flags]
    return subprocess.run(
        command,
        env={**os.environ, **env, "TRACKING_LISTEN": "127.0.0.1:0"},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_refuses_zero_workers() -> None:
    # It used to start one server, as if --workers 1 had been given.
    done = _serve({}, "--workers", "0")
    assert done.returncode == 2
    assert "workers" in done.stderr


@pytest.mark.parametrize("ttl", ["0", "-5", "nan"])
def test_serve_refuses_a_fanout_interest_ttl_that_is_not_positive(
    production_env: dict[str, str], ttl: str
) -> None:
    # With 0 the heartbeat ran without pause: 70 % of a core and 4,000 Redis
    # scripts a second on an idle server, and its interest expired at once.
    done = _serve({**production_env, "TRACKING_FANOUT_INTEREST_TTL_S": ttl})
    assert done.returncode == 2
    assert "fanout_interest_ttl_s" in done.stderr
