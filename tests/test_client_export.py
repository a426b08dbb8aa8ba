"""``tracking export``: a stored track written as GPX, GeoJSON or CSV, against a real
server on port 0, after replaying a real trace into it."""

from __future__ import annotations

import csv
import io
import json
import os
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import TRACES, require_shared
from tests.test_client_cli import parse, run
from tracking_grpc.client import export

CAR = "gpxpy_around-visnjan-with-car.gpx"
CAR_DEVICE = "gpxpy_around-visnjan-with-car"
CAR_FIXES = 104
GPX = "{http://www.topografix.com/GPX/1/1}"


@pytest.fixture
async def car_server(server, capsysbinary):
    assert await run(server, "replay", str(require_shared(TRACES / CAR)), "--fast") == 0
    capsysbinary.readouterr()  # the replay's summary
    return server


async def test_gpx_to_standard_output_holds_every_stored_fix(car_server, capsysbinary):
    assert await run(car_server, "export", CAR_DEVICE, "--format", "gpx") == 0
    root = ET.fromstring(capsysbinary.readouterr().out)
    points = root.findall(f".//{GPX}trkpt")
    assert len(points) == CAR_FIXES
    last = points[-1]
    assert (float(last.get("lat")), float(last.get("lon"))) == pytest.approx(
        (45.2733349521, 13.7139970623)
    )


async def test_csv_and_geojson_to_a_file(car_server, tmp_path):
    tmp_path = tmp_path / "out"  # beside the server's data directory
    tmp_path.mkdir()
    out = tmp_path / "car.csv"
    assert (
        await run(car_server, "export", CAR_DEVICE, "--format", "csv", "-o", str(out))
        == 0
    )
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == CAR_FIXES
    assert [p.name for p in tmp_path.iterdir()] == ["car.csv"]  # no part file left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    geo = tmp_path / "car.geojson"
    argv = ["export", CAR_DEVICE, "--format", "geojson", "--output", str(geo)]
    assert await run(car_server, *argv) == 0
    document = json.loads(geo.read_text())
    coordinates = [
        point
        for feature in document["features"]
        if feature["geometry"]["type"] == "LineString"
        for point in feature["geometry"]["coordinates"]
    ]
    assert len(coordinates) == CAR_FIXES


async def test_simplified_export_keeps_fewer_fixes(car_server, capsysbinary):
    argv = ["export", CAR_DEVICE, "--format", "csv", "--simplify-m", "50"]
    assert await run(car_server, *argv) == 0
    rows = list(csv.DictReader(io.StringIO(capsysbinary.readouterr().out.decode())))
    assert 2 <= len(rows) < CAR_FIXES


async def test_a_range_before_the_replay_is_an_empty_track(car_server, capsysbinary):
    argv = ["export", CAR_DEVICE, "--format", "csv", "--from", "2001-01-01T00:00"]
    assert await run(car_server, *[*argv, "--to", "2001-01-02T00:00Z"]) == 0
    assert (
        list(csv.DictReader(io.StringIO(capsysbinary.readouterr().out.decode()))) == []
    )


async def test_a_failed_call_leaves_no_file(car_server, tmp_path, capsysbinary):
    tmp_path = tmp_path / "out"  # beside the server's data directory
    tmp_path.mkdir()
    out = tmp_path / "x.gpx"
    # A range over 366 days is refused by the server, naming the field.
    argv = ["export", CAR_DEVICE, "--since-s", str(400 * 86_400), "-o", str(out)]
    assert await run(car_server, *argv) == 1
    assert "INVALID_ARGUMENT" in capsysbinary.readouterr().err.decode()
    assert list(tmp_path.iterdir()) == []


async def test_to_before_from_is_refused_before_any_call(capsys):
    args = parse("export", "d", "--from", "2026-12-02", "--to", "2026-12-01")
    assert await args.command(args) == 2
    assert "--to must come after --from" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_the_call(tmp_path, capsys):
    for path, words in [
        (tmp_path / "no" / "x.gpx", "no directory"),
        (tmp_path, "is a directory"),
    ]:
        with pytest.raises(SystemExit) as exited:
            parse("export", "d", "-o", str(path))
        assert exited.value.code == 2
        assert words in capsys.readouterr().err


def test_since_and_from_together_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        parse("export", "d", "--since-s", "60", "--from", "2026-12-01")
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_an_id_that_starts_with_a_dash_follows_two_dashes():
    assert parse("export", "--format", "csv", "--", "-2+3").device_id == "-2+3"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("export", "d", "--from", "yesterday"), "--from"),
        (("export", "d", "--since-s", "0"), "--since-s"),
        (("export", "d", "--simplify-m", "-1"), "--simplify-m"),
        (("export", "d", "--format", "kml"), "--format"),
    ],
)
def test_bad_flags_are_usage_errors_naming_them(argv, flag, capsys):
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_times_without_an_offset_are_utc():
    assert export.parse_time("1970-01-01T00:00:01") == 1000
    assert export.parse_time("1970-01-01T01:00:00+01:00") == 0
    args = parse("export", "d", "--since-s", "60")
    assert export.time_range(args, 100_000) == (40_000, 100_000)
    args = parse("export", "d", "--to", "1970-01-02T00:00Z")  # a day up to --to
    assert export.time_range(args, 10**12) == (0, 86_400_000)
