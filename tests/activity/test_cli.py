"""``tracking trips FILE`` prints a trace's trips and stops."""

from __future__ import annotations

from tests.conftest import TRACES, require_shared
from tracking_grpc.cli import main


def test_trips_of_the_bus_trace(capsys):
    path = require_shared(TRACES / "liverpool_bus_route14_outbound.csv")
    assert main(["trips", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(" trip " in line for line in lines) == 17
    assert lines[-1].startswith("1533 fixes, 0 not trusted")


def test_trips_of_a_missing_file_is_one_line(capsys, tmp_path):
    assert main(["trips", str(tmp_path / "none.gpx")]) == 2
    assert "trace: no such file" in capsys.readouterr().err


def test_trips_of_a_path_that_is_no_file_says_so(capsys, tmp_path):
    """A directory (or /dev/null) exists: "no such file" would mislead."""
    assert main(["trips", str(tmp_path)]) == 2
    assert "trace: not a regular file" in capsys.readouterr().err
