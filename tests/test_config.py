"""Settings: defaults < TOML file < environment < flags."""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tracking_grpc import config
from tracking_grpc.errors import InvalidArgument


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_later_sources_win(tmp_path) -> None:
    toml = tmp_path / "tracking.toml"
    toml.write_text('listen = "127.0.0.1:1"\nworkers = 3\nmax_fix_age_s = 5\n')
    env = {"TRACKING_WORKERS": "4", "TRACKING_LOG_LEVEL": "DEBUG"}
    settings = config.load(parse("--config", str(toml), "--workers", "2"), env)
    assert (settings.listen, settings.workers) == ("127.0.0.1:1", 2)
    assert (settings.max_fix_age_s, settings.log_level) == (5.0, "DEBUG")


def test_tracking_table_in_toml(tmp_path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text('[tracking]\ndata_dir = "/srv/tracking"\n')
    assert config.load(parse("--config", str(toml)), {}).data_dir == "/srv/tracking"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        pytest.param({"workers": "many"}, "environment:workers", id="bad-int"),
        pytest.param({"colour": "blue"}, "environment:colour", id="unknown"),
    ],
)
def test_bad_values_name_the_setting(values, field) -> None:
    with pytest.raises(InvalidArgument) as raised:
        config.Settings().merged(values, "environment")
    assert raised.value.field == field


@pytest.mark.parametrize(
    ("line", "setting"),
    [
        pytest.param("max_batch_fixes = 1.5", "max_batch_fixes", id="float-for-int"),
        pytest.param("workers = true", "workers", id="bool-for-int"),
        pytest.param("max_fix_age_s = true", "max_fix_age_s", id="bool-for-float"),
        pytest.param('data_dir = ["a", "b"]', "data_dir", id="list-for-path"),
        pytest.param("redis_key_prefix = 5", "redis_key_prefix", id="int-for-str"),
        pytest.param('workers = "2"', "workers", id="str-for-int"),
        pytest.param('max_fix_age_s = "5"', "max_fix_age_s", id="str-for-float"),
        pytest.param("workers = 2.0", "workers", id="whole-float-for-int"),
    ],
)
def test_toml_values_of_another_type_are_refused(tmp_path, line, setting) -> None:
    """A TOML value is typed already: one of another kind is refused, naming the
    file and setting, not truncated (1.5 to 1) or turned into text ("['a', 'b']")."""
    toml = tmp_path / "tracking.toml"
    toml.write_text(f"[tracking]\n{line}\n")
    with pytest.raises(InvalidArgument) as raised:
        config.load(parse("--config", str(toml)), {})
    assert raised.value.field == f"{toml}:{setting}"
    assert "expected" in str(raised.value)


def test_serve_refuses_a_toml_number_written_as_text(tmp_path) -> None:
    """The environment and flags are text, parsed; a TOML file is typed."""
    toml = tmp_path / "tracking.toml"
    toml.write_text('workers = "2"\n')
    done = serve(tmp_path, "--config", str(toml), "--listen", "127.0.0.1:0")
    assert done.returncode == 2
    assert done.stderr == f"tracking: {toml}:workers: expected int, got '2'\n"
    environment = config.load(None, {"TRACKING_WORKERS": "2"})
    assert environment.workers == 2


def test_toml_integers_are_taken_for_decimal_settings(tmp_path) -> None:
    toml = tmp_path / "tracking.toml"
    toml.write_text("max_fix_age_s = 5\nworkers = 1\n")
    settings = config.load(parse("--config", str(toml)), {})
    assert (settings.max_fix_age_s, settings.workers) == (5.0, 1)


def test_unknown_environment_variables_are_ignored() -> None:
    assert config.load(None, {"TRACKING_NOPE": "1"}) == config.Settings()


BAD_SETTINGS = [
    pytest.param({"listen": "127.0.0.1:99999"}, "listen", id="port-above-65535"),
    pytest.param({"listen": "127.0.0.1"}, "listen", id="no-port"),
    pytest.param({"listen": "127.0.0.1:-1"}, "listen", id="negative-port"),
    pytest.param({"listen": ":50051"}, "listen", id="no-host"),
    pytest.param({"metrics_listen": "0.0.0.0:70000"}, "metrics_listen", id="metrics"),
    pytest.param({"workers": 0}, "workers", id="workers-0"),
    pytest.param({"max_pending_fixes": 0}, "max_pending_fixes", id="pending-0"),
    pytest.param({"event_queue_max": 0}, "event_queue_max", id="event-queue-0"),
    pytest.param(
        {"event_stream_partitions": 0}, "event_stream_partitions", id="partitions-0"
    ),
    pytest.param(
        {"event_stream_partitions": 1_025},
        "event_stream_partitions",
        id="partitions-above-1024",
    ),
    pytest.param({"max_batch_fixes": -1}, "max_batch_fixes", id="batch-negative"),
    pytest.param({"flush_max_fixes": 0}, "flush_max_fixes", id="flush-0"),
    pytest.param({"commits_in_flight": 0}, "commits_in_flight", id="commits-0"),
    pytest.param({"database_pool_size": 0}, "database_pool_size", id="pool-0"),
    pytest.param(
        {"fanout_interest_ttl_s": 0.0}, "fanout_interest_ttl_s", id="ttl-zero"
    ),
    pytest.param(
        {"database_timeout_s": math.nan}, "database_timeout_s", id="timeout-nan"
    ),
    pytest.param(
        {"flush_interval_ms": -1.0}, "flush_interval_ms", id="flush-interval-negative"
    ),
    pytest.param({"max_fix_age_s": math.inf}, "max_fix_age_s", id="age-infinite"),
    pytest.param({"retention_days": -1}, "retention_days", id="retention-negative"),
    pytest.param(
        {"activity_checkpoint_s": -1.0}, "activity_checkpoint_s", id="checkpoint-neg"
    ),
    pytest.param(  # 10**20 days overflowed SQLite and PostgreSQL at purge time
        {"retention_days": 10**20}, "retention_days", id="retention-overflow"
    ),
    pytest.param({"retention_days": 36_501}, "retention_days", id="retention-century"),
    pytest.param(
        {"max_token_lifetime_s": 1e308},
        "max_token_lifetime_s",
        id="token-lifetime-huge",
    ),
    pytest.param({"default_tenant": "a\x00b"}, "default_tenant", id="tenant-nul"),
    pytest.param({"default_tenant": " "}, "default_tenant", id="tenant-blank"),
    pytest.param({"write_timeout_s": 0.0}, "write_timeout_s", id="write-timeout-0"),
    pytest.param({"max_watchers": 0}, "max_watchers", id="watchers-0"),
    pytest.param(
        {"max_token_lifetime_s": 0.0}, "max_token_lifetime_s", id="token-lifetime-0"
    ),
    pytest.param(
        {"max_token_lifetime_s": math.inf},
        "max_token_lifetime_s",
        id="token-lifetime-infinite",
    ),
    pytest.param({"stream_window_kb": -1}, "stream_window_kb", id="window-negative"),
    pytest.param(
        {"trace_sample_ratio": 1.5}, "trace_sample_ratio", id="sample-ratio-above-1"
    ),
    pytest.param(
        {"sqlite_synchronous": "BOGUS"}, "sqlite_synchronous", id="synchronous"
    ),
    pytest.param({"log_level": "LOUD"}, "log_level", id="log-level"),
    pytest.param({"log_format": "xml"}, "log_format", id="log-format"),
    pytest.param({"auth_mode": "maybe"}, "auth_mode", id="auth-mode"),
    pytest.param(
        {"jwt_rs256_public_key_file": "/nonexistent/key.pem"},
        "jwt_rs256_public_key_file",
        id="missing-key-file",
    ),
    pytest.param(
        {"activity_config": "/nonexistent/rules.toml"},
        "activity_config",
        id="missing-activity-rules",
    ),
    pytest.param({"jwt_hs256_secret": "short"}, "jwt_hs256_secret", id="hs256-5b"),
    pytest.param({"database_url": "mysql://x/db"}, "database_url", id="mysql-url"),
    pytest.param({"database_url": "no equals"}, "database_url", id="garbled-url"),
    pytest.param({"redis_url": "http://x"}, "redis_url", id="http-redis-url"),
    pytest.param({"redis_url": "127.0.0.1:6379"}, "redis_url", id="no-scheme"),
    pytest.param(
        {"jwt_hs256_secret": "é" * 15}, "jwt_hs256_secret", id="hs256-30-bytes"
    ),
]


@pytest.mark.parametrize(("values", "field"), BAD_SETTINGS)
def test_settings_the_service_cannot_run_with_are_refused(values, field) -> None:
    with pytest.raises(InvalidArgument) as raised:
        config.check(replace(config.Settings(), **values))
    assert raised.value.field == field


def test_the_defaults_and_lower_case_choices_pass() -> None:
    config.check(config.Settings())
    config.check(
        config.Settings(
            database_url="host=127.0.0.1 dbname=tracking",  # a connection string
            redis_url="rediss://127.0.0.1:6380/0",
        )
    )
    config.check(
        config.Settings(sqlite_synchronous="normal", log_level="debug", listen="[::]:0")
    )


def serve(
    tmp_path: Path, *flags: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "TRACKING_DATA_DIR": str(tmp_path / "data")}
    env.pop("TRACKING_CONFIG", None)
    command = [sys.executable, "-m", "tracking_grpc", "serve", *flags]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=20, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        pytest.param(
            ["--listen", "127.0.0.1:99999"],
            "listen: port 99999 is not in [0, 65535]",
            id="listen-port",
        ),
        pytest.param(
            ["--max-pending-fixes", "0"],
            "max_pending_fixes: must be at least 1",
            id="pending-0",
        ),
        pytest.param(
            ["--max-batch-fixes", "-1"],
            "max_batch_fixes: must be at least 1",
            id="batch-negative",
        ),
        pytest.param(
            ["--sqlite-synchronous", "BOGUS"],
            "sqlite_synchronous: must be one of off, normal, full, extra",
            id="synchronous",
        ),
        pytest.param(
            ["--log-level", "LOUD"],
            "log_level: must be one of debug, info, warning, error",
            id="log-level",
        ),
        pytest.param(
            ["--auth-mode", "jwt", "--jwt-rs256-public-key-file", "/nonexistent.pem"],
            "jwt_rs256_public_key_file: cannot read /nonexistent.pem",
            id="missing-key",
        ),
        pytest.param(
            ["--config", "/nonexistent.toml"],
            "config: cannot read /nonexistent.toml: No such file or directory",
            id="missing-config",
        ),
        pytest.param(["--workers", "0"], "workers: must be at least 1", id="workers"),
        pytest.param(
            ["--database-url", "mysql://x"],
            "database_url: expected postgresql://..., got a mysql:// URL",
            id="database-url",
        ),
        pytest.param(
            ["--redis-url", "http://x"],
            "redis_url: expected redis://, rediss:// or unix://, got a http:// URL",
            id="redis-url",
        ),
    ],
)
def test_serve_refuses_bad_settings_with_one_line(tmp_path, flags, words) -> None:
    done = serve(tmp_path, "--listen", "127.0.0.1:0", *flags)
    assert done.returncode == 2
    assert done.stderr == f"tracking: {words}\n"


@pytest.fixture
def taken_port():
    """A loopback port another socket listens on."""
    with socket.socket() as taker:
        taker.bind(("127.0.0.1", 0))
        taker.listen()
        yield taker.getsockname()[1]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        pytest.param(
            ["--listen", "127.0.0.1:{port}"],
            "listen: cannot listen on 127.0.0.1:{port} (the port is taken, or the "
            "address is not this machine's)",
            id="listen",
        ),
        pytest.param(
            ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:{port}"],
            "metrics_listen: cannot listen on 127.0.0.1:{port}: Address already in use",
            id="metrics-listen",
        ),
    ],
)
def test_serve_refuses_a_taken_port_with_one_line(
    tmp_path, taken_port, flags, words
) -> None:
    done = serve(tmp_path, *(flag.format(port=taken_port) for flag in flags))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == f"tracking: {words.format(port=taken_port)}"


def test_workers_refuse_a_port_another_server_listens_on(
    tmp_path, production_env
) -> None:
    """Another server's socket listens with SO_REUSEPORT, as gRPC's do: the
    workers could bind beside it and share its connections, so the supervisor
    refuses the port before it forks any."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        flags = ["--workers", "2", "--listen", f"127.0.0.1:{port}"]
        done = serve(tmp_path, *flags, env=production_env)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr == (
        f"tracking: listen: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


def test_workers_stop_when_the_metrics_port_is_taken(
    tmp_path, taken_port, production_env
) -> None:
    """The supervisor has forked its workers when it finds the metrics port
    taken: it stops them before it exits."""
    with socket.create_server(("127.0.0.1", 0)) as free:
        port = free.getsockname()[1]
    listen = f"127.0.0.1:{port}"
    flags = ["--workers", "2", "--listen", listen]
    metrics_listen = f"127.0.0.1:{taken_port}"
    done = serve(
        tmp_path, *flags, "--metrics-listen", metrics_listen, env=production_env
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.endswith(
        f"tracking: metrics_listen: cannot listen on 127.0.0.1:{taken_port}: "
        "Address already in use\n"
    )
    socket.create_server(("127.0.0.1", port)).close()  # no worker serves on
