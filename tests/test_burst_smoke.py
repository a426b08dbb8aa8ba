"""The burst benchmark end to end, small (bench/burst.py): every fix of the burst
is stored, the prober hears both servers in every phase, and the server stops
cleanly after. Counts only; the times are the benchmark's to report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.backends import bench_production_flags
from tests.conftest import ROOT

SMALL = ["--fences", "20", "--idle-s", "0.5", "--after-s", "1"]


def run_burst(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "burst.json"
    command = [sys.executable, "bench/burst.py", *SMALL, *extra, "--json", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=180)
    return json.loads(out.read_text())


def assert_burst_stored_and_probed(result: dict, fixes: int) -> None:
    assert result["stored"] == fixes
    assert result["server_exit_code"] == 0
    for key in ("health", "peer_health"):
        assert set(result[key]) == {"idle", "burst", "after"}
        assert all(s["count"] > 0 and s["failed"] == 0 for s in result[key].values())


def test_a_device_backlog_on_the_embedded_store(tmp_path: Path) -> None:
    extra = ["--one-device", "--fixes", "3000", "--batch", "1000"]
    result = run_burst(tmp_path, *extra, "--concurrency", "1")
    assert_burst_stored_and_probed(result, 3000)


@pytest.mark.postgres
@pytest.mark.redis
def test_gateway_batches_on_the_production_backends(tmp_path: Path) -> None:
    extra = ["--fixes", "6000", "--batch", "1000", "--devices", "2000"]
    result = run_burst(tmp_path, *extra, *bench_production_flags())
    assert_burst_stored_and_probed(result, 6000)
