"""The Track CPU benchmark end to end, small (bench/track_cost.py): a server of this
checkout acks every message of the steady window, and the report has its CPU per
message. Counts only; the times are the benchmark's to report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.backends import bench_production_flags
from tests.conftest import ROOT

SMALL = [
    *("--streams", "20", "--interval-s", "0.5"),
    *("--ramp-s", "0.5", "--settle-s", "0.5", "--steady-s", "2"),
]


def run_track_cost(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "track_cost.json"
    command = [
        sys.executable,
        "bench/track_cost.py",
        *SMALL,
        *extra,
        "--json",
        str(out),
    ]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=180)
    return json.loads(out.read_text())


def assert_acked_and_measured(result: dict) -> None:
    [round_] = result["rounds"]
    assert round_["side"] == "head"
    # 20 streams at 2 messages/s for 2 s: about 80 acks
    assert 60 <= round_["messages"] <= 100
    assert round_["errors"] == {}
    assert round_["server_cpu_s"] > 0 and round_["cpu_us_per_message"] > 0


def test_the_embedded_store(tmp_path: Path) -> None:
    assert_acked_and_measured(run_track_cost(tmp_path))


@pytest.mark.postgres
@pytest.mark.redis
def test_the_production_backends(tmp_path: Path) -> None:
    assert_acked_and_measured(run_track_cost(tmp_path, *bench_production_flags()))
