"""The load tool's reading of a server's stalls from its /metrics."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prometheus_client import generate_latest

from tracking_grpc.loadgen import stalls
from tracking_grpc.observability import metrics


@pytest.fixture
def endpoint():
    """/metrics of this process's registry on a loopback port of its own."""
    registry = metrics.enable()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = generate_latest(registry)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()
    metrics.disable()


def test_stalls_count_what_happened_between_snapshots(endpoint):
    metrics.loop_lagged(0.2)  # before the window: not counted
    metrics.gc_paused(0, 0.3)
    before = stalls.snapshot(endpoint)
    for lag in (0.0001, 0.003, 0.03, 0.03, 0.2):
        metrics.loop_lagged(lag)
    metrics.gc_paused(0, 0.0004)
    metrics.gc_paused(0, 0.004)
    metrics.gc_paused(1, 0.12)
    found = stalls.between(before, stalls.snapshot(endpoint))
    assert found["loop_lag_samples"] == 5
    assert found["loop_lag_over_ms"] == {"10": 3, "25": 3, "100": 1}
    assert found["loop_lag_longest_at_most_ms"] == 250.0
    young, middle = found["gc"]["young"], found["gc"]["middle"]
    assert (young["passes"], young["longest_at_most_ms"]) == (2, 5.0)
    assert young["paused_s"] == pytest.approx(0.004, abs=1e-3)
    assert middle["over_ms"] == {"10": 1, "25": 1, "100": 1}
    assert "GC middle 1 passes" in stalls.describe(found)


def test_a_quiet_window_has_no_longest_pause(endpoint):
    metrics.loop_lagged(0.001)
    before = stalls.snapshot(endpoint)
    found = stalls.between(before, stalls.snapshot(endpoint))
    assert found["loop_lag_samples"] == 0
    assert found["loop_lag_longest_at_most_ms"] is None


def test_server_ack_and_commit_times_are_summarised(endpoint):
    metrics.fix_acked(0.4)  # before the window: not counted
    before = stalls.snapshot(endpoint)
    for seconds in [0.003] * 98 + [0.03, 0.2]:
        metrics.fix_acked(seconds)
    for backend, seconds in (("postgres", 0.002), ("postgres", 0.004), ("x", 0.06)):
        metrics.storage_flushed(backend, 20, seconds)
    metrics.commit_started(10_000, [9_998, 9_980, 9_970])
    found = stalls.between(before, stalls.snapshot(endpoint))
    ack = found["server_ack"]
    assert ack["count"] == 100
    assert ack["p50_at_most_ms"] == 5.0
    assert ack["p99_at_most_ms"] == 50.0
    assert ack["over_ms"] == {"10": 2, "25": 2, "50": 1, "100": 1}
    assert ack["mean_ms"] == pytest.approx((98 * 3 + 30 + 200) / 100, abs=0.01)
    commit = found["commit"]  # summed over backends
    assert (commit["count"], commit["over_ms"]["50"]) == (3, 1)
    wait = found["commit_wait"]
    assert (wait["count"], wait["over_ms"]["10"], wait["over_ms"]["25"]) == (3, 2, 1)
    assert "server ack mean" in stalls.describe(found)
    assert "wait for commit mean" in stalls.describe(found)


def test_an_empty_registry_reads_as_no_stalls():
    nothing = {
        "count": 0,
        "mean_ms": None,
        "p50_at_most_ms": None,
        "p99_at_most_ms": None,
        "over_ms": {"10": 0, "25": 0, "50": 0, "100": 0},
    }
    assert stalls.between({}, {}) == {
        "loop_lag_samples": 0,
        "loop_lag_over_ms": {"10": 0, "25": 0, "100": 0},
        "loop_lag_longest_at_most_ms": None,
        "gc": {},
        "server_ack": nothing,
        "commit_wait": nothing,
        "commit": nothing,
    }
