"""The load tool end to end, small: a few hundred streams for a few seconds.

Runs ``bench/load.py`` as a program (it starts its own server on loopback and its
own driver processes) and checks counts, not times: every fix generated is acked,
seen by the watcher and stored exactly once, also across a reconnect storm (which
cuts the watcher's stream too), with the device streams in Python driver processes
and in Node.js ones (``--device-driver node``); and with ``serve --workers 2``
when the worker serving the watcher is killed, or the run's private Redis restarted:
the watcher comes back and hears every device again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.backends import bench_production_flags
from tests.conftest import ROOT, require_service
from tests.services import ServerProcess
from tracking_grpc.loadgen.node import NodeDriverError, check_installed

SMALL = ["--devices", "200", "--interval-s", "0.5", "--drivers", "2"]
SMALL += ["--ramp-s", "1", "--steady-s", "3", "--watchers", "1"]
STORM = ["--storm", "--storm-at-s", "1", "--storm-spread-s", "1"]


def run_load(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "load.json"
    command = [sys.executable, "bench/load.py", *SMALL, *extra, "--json", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=120)
    return json.loads(out.read_text())


def assert_every_fix_settled_once(result: dict) -> None:
    assert result["errors"] == {}
    assert_settled_once(result)


def assert_settled_once(result: dict) -> None:
    counts = result["counts"]
    assert result["streams_open"] == 200
    # A fix whose ack was cut off may be stored after its device's hello was
    # answered; its resend is then acked as a duplicate. The rows themselves are
    # checked below: none lost, none twice.
    settled = (
        counts["fixes_stored"]
        + counts.get("fixes_acked_by_resume", 0)
        + counts.get("fixes_duplicate", 0)
    )
    assert settled == counts["fixes_generated"]
    assert result["verify"]["devices_checked"] == 200
    assert result["verify"]["fixes_lost"] == 0
    assert result["verify"]["fixes_acked_not_stored"] == 0
    assert result["verify"]["devices_with_gaps_or_extra"] == 0
    assert result["watch"]["count"] > 0 and result["ack"]["count"] > 0
    stalls = result["server"]["stalls"]  # from the server's /metrics
    assert stalls["loop_lag_samples"] > 0 and "young" in stalls["gc"]
    # A message's ack time is its wait for a group commit and the commit's write.
    assert stalls["commit_wait"]["count"] > 0 and stalls["server_ack"]["count"] > 0
    # What the run's own processes did not use of what the machine did.
    assert result["other_work_cores"] < result["machine_busy_cores"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [pytest.param([], id="steady"), pytest.param(STORM, id="storm")]
)
def test_every_fix_is_acked_watched_and_stored_once(tmp_path: Path, extra) -> None:
    result = run_load(tmp_path, *extra)
    assert_every_fix_settled_once(result)
    cut = 1 if extra == STORM else 0  # the storm cuts the watcher's stream too
    assert result["counts"].get("watch_streams_dropped", 0) == cut
    assert_watcher_hears_every_device(result, reconnects=cut)


def assert_watcher_hears_every_device(result: dict, reconnects: int) -> None:
    """The one watcher (of the whole tenant) reconnected ``reconnects`` times and
    had live updates of all 200 devices in the window and on its last stream."""
    watchers = result["watchers"]
    assert result["counts"].get("watch_reconnects", 0) == reconnects
    assert watchers["reconnects_each"] == [reconnects]
    assert watchers["devices_updated_each"] == [200]
    assert watchers["devices_updated_on_last_stream_each"] == [200]
    if reconnects:  # a new stream starts with a snapshot of every device
        assert result["counts"]["watch_snapshot_positions"] == 200 * reconnects


@pytest.mark.slow
def test_peer_run_measures_the_same_devices_against_a_bare_echo(tmp_path) -> None:
    result = run_load(tmp_path, "--peer")
    assert_every_fix_settled_once(result)
    peer = result["peer"]
    assert peer["errors"] == {} and peer["streams_open"] == 200
    # The echo acks every fix and passes each to the whole-tenant watcher (two of
    # a device within one write go as the newer).
    generated = peer["counts"]["fixes_generated"]
    assert peer["counts"]["fixes_stored"] == generated
    assert 0 < peer["counts"]["watch_positions"] <= generated
    assert peer["ack"]["count"] > 0 and peer["watch"]["count"] > 0
    compared = result["vs_peer"]
    for name in ("ack p99 (ms)", "watcher p99 (ms)", "server CPU per fix (µs)"):
        row = compared[name]
        assert row["ratio"] == round(row["server"] / row["peer"], 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        # Gateways stay in a Python process beside the node one of the same index.
        pytest.param(
            ["--gateways", "1", "--gateway-rate", "4", "--gateway-batch", "100"],
            id="steady-with-gateway",
        ),
        pytest.param(STORM, id="storm"),
    ],
)
def test_node_device_driver_settles_every_fix_once(tmp_path: Path, extra) -> None:
    try:
        check_installed()
    except NodeDriverError as exc:
        require_service("node device driver", str(exc))
    # The watcher follows 50 ids made by the Python side's device_id(): updates
    # reach it only if the node driver names its devices the same way.
    node = ["--device-driver", "node", "--watch-devices", "50"]
    result = run_load(tmp_path, *node, *extra)
    assert result["device_driver"] == "node"
    assert_every_fix_settled_once(result)
    if extra == STORM:
        assert result["counts"]["streams_dropped"] == 200
        assert result["storm"]["devices_resumed"] == 200
        assert result["storm"]["devices_recovered"] == 200


def test_gateway_batches_are_stored(tmp_path: Path) -> None:
    result = run_load(
        tmp_path,
        "--devices",
        "0",
        "--gateways",
        "2",
        "--gateway-rate",
        "20",
        "--gateway-batch",
        "200",
        "--gateway-devices",
        "1000",
        "--watchers",
        "0",
    )
    assert result["errors"] == {}
    assert result["counts"]["fixes_stored"] == result["counts"]["fixes_generated"] > 0
    assert result["batch"]["count"] > 0
    checked = result["verify"]  # what the store holds, not what the acks said
    assert checked["gateway_fixes_sent"] == result["counts"]["fixes_generated"]
    assert checked["gateway_fixes_stored_rows"] == checked["gateway_fixes_sent"]
    assert checked["gateway_fixes_missing"] == 0


@pytest.fixture
def running_server(tmp_path: Path):
    """A server of the test's own, left running between load runs."""
    server = ServerProcess({"TRACKING_DATA_DIR": str(tmp_path / "data")})
    server.start()
    yield server
    server.stop()


def target_load(server: ServerProcess, tmp_path: Path, *extra: str) -> dict:
    """A small run of devices and one gateway against ``server``."""
    flags = ["--target", server.address, "--server-pid", str(server.process.pid)]
    flags += ["--watchers", "0", "--gateways", "1", "--gateway-rate", "10"]
    flags += ["--gateway-batch", "100", "--gateway-devices", "500"]
    return run_load(tmp_path, *flags, *extra)


def test_a_second_run_against_the_same_server_stores_its_fixes(
    running_server, tmp_path: Path
) -> None:
    target_load(running_server, tmp_path)
    again = target_load(running_server, tmp_path)
    assert again["errors"] == {}
    assert again["counts"]["fixes_stored"] == again["counts"]["fixes_generated"] > 0


def test_a_run_tag_used_before_is_reported(running_server, tmp_path: Path) -> None:
    target_load(running_server, tmp_path, "--run-tag", "again")
    again = target_load(running_server, tmp_path, "--run-tag", "again")
    assert again["errors"]["device_id_in_use"] >= 200  # every device, once at least
    assert again["errors"]["gateway_fixes_duplicate"] > 0
    assert "--run-tag" in again["error_details"]["device_id_in_use"]


@pytest.mark.postgres
@pytest.mark.redis
def test_production_backends_store_every_fix_once(tmp_path: Path) -> None:
    result = run_load(tmp_path, *bench_production_flags(), "--fences", "20")
    assert result["errors"] == {}
    assert result["verify"]["fixes_lost"] == 0 and result["fences"] == 20
    assert result["verify"]["devices_with_gaps_or_extra"] == 0


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_a_private_redis_cluster_serves_the_run(tmp_path: Path) -> None:
    """``--redis-shards 1``: the run's own Redis Cluster of one master (its server
    info comes back unwrapped, which the live store once mistook for a mapping).
    Three masters are run by tests/test_cluster_server.py and the bench matrix."""
    shards = 1
    from tests.backends import PG_ADMIN_URL, admin_execute

    if shutil.which("redis-server") is None:
        require_service("redis-server", "redis-server is not installed")
    try:
        admin_execute("SELECT 1")
    except Exception as exc:
        require_service("postgres", str(exc))
    extra = ["--production", "--pg-admin-url", PG_ADMIN_URL]
    result = run_load(tmp_path, *extra, "--redis-shards", str(shards))
    assert result["errors"] == {}
    assert result["redis_shards"] == shards
    assert result["backend_exact"]["redis-server"] is True
    assert len(result["redis_shard_cpu_cores"]) == shards
    assert result["verify"]["fixes_lost"] == 0
    assert result["verify"]["devices_with_gaps_or_extra"] == 0
    assert result["watch"]["count"] > 0


# Two workers; streams on channels of 50, so that both workers hold some.
WORKERS = ["--workers", "2", "--streams-per-channel", "50", "--steady-s", "5"]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_watcher_and_devices_come_back_after_a_worker_is_killed(tmp_path) -> None:
    """The worker serving the watcher is killed (SIGKILL): its streams end with
    UNAVAILABLE, the watcher and those devices reconnect to the other worker."""
    extra = [*bench_production_flags(), *WORKERS, "--kill-worker-at-s", "1"]
    result = run_load(tmp_path, *extra)
    [fault] = result["faults"]
    assert (fault["kind"], fault["chosen"]) == ("kill_worker", "served the watchers")
    assert result["server"]["processes_gone"] == [fault["pid"]]
    errors = result["errors"]
    assert errors["watch_UNAVAILABLE"] == 1
    assert set(errors) <= {"watch_UNAVAILABLE", "track_UNAVAILABLE", "track_INTERNAL"}
    if "track_INTERNAL" in errors:
        # grpc-python's core reports a write onto the killed worker's reset
        # connection as INTERNAL, not UNAVAILABLE; nothing else may be INTERNAL.
        detail = result["error_details"]["track_INTERNAL"]
        assert detail.endswith(": Internal error from Core")
    assert_settled_once(result)
    assert_watcher_hears_every_device(result, reconnects=1)


@pytest.mark.slow
@pytest.mark.postgres
def test_watcher_hears_every_device_after_a_redis_restart(tmp_path) -> None:
    """The run's private Redis is killed and started again, empty: the watch stream
    stays open and every device's updates reach it again."""
    if shutil.which("redis-server") is None:
        require_service("redis-server", "redis-server is not installed")
    extra = [*bench_production_flags(), *WORKERS, "--redis-shards", "1"]
    result = run_load(tmp_path, *extra, "--restart-redis-at-s", "1")
    [fault] = result["faults"]
    assert fault["kind"] == "restart_redis" and "error" not in fault
    assert result["errors"] == {}
    assert_settled_once(result)
    assert_watcher_hears_every_device(result, reconnects=0)
