"""Settings: defaults < TOML file < environment < flags."""

from __future__ import annotations

import argparse

import pytest

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


def test_unknown_environment_variables_are_ignored() -> None:
    assert config.load(None, {"TRACKING_NOPE": "1"}) == config.Settings()
