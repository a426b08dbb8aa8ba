"""The load tool's private PostgreSQL server takes the settings it is given, and the
tool refuses settings it could not pass on safely."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from tests.conftest import ROOT, require_service

sys.path.insert(0, str(ROOT / "bench"))
from load_backends import PrivatePostgres


def test_private_postgres_runs_with_the_settings_given() -> None:
    try:
        server = PrivatePostgres(["shared_buffers=48MB", "wal_compression=lz4"])
    except FileNotFoundError as exc:
        require_service("PostgreSQL binaries", str(exc))
    try:
        server.start()
        with psycopg.connect(server.admin_url) as conn:
            shown = [
                conn.execute(f"SHOW {name}").fetchone()[0]
                for name in ("shared_buffers", "wal_compression", "fsync")
            ]
        assert shown == ["48MB", "lz4", "on"]  # durable as the shared server
    finally:
        server.destroy()


PRIVATE = ["--production", "--private-postgres", "--postgres-setting"]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--production", "--postgres-setting", "shared_buffers=2GB"], "needs"),
        ([*PRIVATE, "fsync"], "expected name=value"),
        ([*PRIVATE, "a=1 -c b=2"], "expected name=value"),
    ],
    ids=["without-private-server", "without-value", "two-in-one"],
)
def test_load_tool_refuses_settings_it_cannot_pass(
    extra: list[str], reason: str
) -> None:
    command = [sys.executable, "bench/load.py", "--devices", "10", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--postgres-setting" in done.stderr and reason in done.stderr
