"""The one-off commands offer flags for the settings they read, not every setting
of the server; the others still come from the TOML file and the environment."""

from __future__ import annotations

import pytest

from tracking_grpc import cli, config
from tracking_grpc.errors import InvalidArgument


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([command, "--help"])
    return capsys.readouterr().out


def test_migrate_offers_only_its_settings(capsys) -> None:
    text = help_text("migrate", capsys)
    assert "--database-url" in text and "--log-level" in text
    assert "--listen" not in text and "--workers" not in text


def test_purge_offers_only_its_settings(capsys) -> None:
    text = help_text("purge", capsys)
    for flag in (
        "--data-dir",
        "--database-url",
        "--redis-key-prefix",
        "--event-stream-partitions",
    ):
        assert flag in text
    assert "--retention-days" in text
    assert "--max-watchers" not in text and "--jwt-hs256-secret" not in text


def test_serve_offers_every_setting(capsys) -> None:
    text = help_text("serve", capsys)
    for name in config.Settings.names():
        assert "--" + name.replace("_", "-") in text


def test_a_setting_without_a_flag_still_comes_from_the_environment() -> None:
    args = cli.build_parser().parse_args(
        ["migrate", "--database-url", "postgresql://x"]
    )
    settings = config.load(args, env={"TRACKING_DATABASE_TIMEOUT_S": "7"})
    assert settings.database_url == "postgresql://x"
    assert settings.database_timeout_s == 7.0
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["migrate", "--listen", "127.0.0.1:1"])


def test_a_one_off_command_checks_only_its_own_settings() -> None:
    """A migration job sharing the server's environment, whose key file is not
    mounted in the job, still runs; its own settings are still checked."""
    env = {
        "TRACKING_JWT_RS256_PUBLIC_KEY_FILE": "/nonexistent/key.pem",
        "TRACKING_WORKERS": "0",
    }
    args = cli.build_parser().parse_args(
        ["migrate", "--database-url", "postgresql://x"]
    )
    assert config.load(args, env=env, only=cli.MIGRATE_SETTINGS).database_url
    with pytest.raises(InvalidArgument) as raised:
        config.load(args, env=env)
    assert raised.value.field in ("jwt_rs256_public_key_file", "workers")
    bad = {**env, "TRACKING_DATABASE_TIMEOUT_S": "-1"}
    with pytest.raises(InvalidArgument) as raised:
        config.load(args, env=bad, only=cli.MIGRATE_SETTINGS)
    assert raised.value.field == "database_timeout_s"


@pytest.mark.parametrize(
    ("argv", "unknown"),
    [
        (["migrate", "--listen", "127.0.0.1:1"], "--listen 127.0.0.1:1"),
        (["purge", "--bogus"], "--bogus"),
        (["positions", "car-1", "--bogus"], "--bogus"),
    ],
)
def test_an_unknown_flag_shows_its_subcommands_usage(argv, unknown, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.parse(argv)
    error = capsys.readouterr().err
    assert exited.value.code == 2
    assert error.startswith(f"usage: tracking {argv[0]} ")
    assert error.rstrip().endswith(f"unrecognized arguments: {unknown}")
