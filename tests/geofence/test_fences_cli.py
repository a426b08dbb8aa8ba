"""``tracking fences`` as a user runs it, against a real server on port 0."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest

from tests.geofence.test_geofence_rpc import enter_then_exit
from tests.test_client_cli import run
from tracking_grpc.errors import InvalidArgument

DEPOTS = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "id": "depot",
            "properties": {"radius_m": 100, "labels": ["depot"], "name": "Depot"},
            "geometry": {"type": "Point", "coordinates": [13.405, 52.52]},
        },
        {
            "type": "Feature",
            "id": "yard",
            "properties": {},
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[2, 48], [3, 48], [3, 49], [2, 48]]],
            },
        },
    ],
}


async def test_import_list_and_events(server, channel, tmp_path, capsys) -> None:
    geojson = tmp_path / "depots.geojson"
    geojson.write_text(json.dumps(DEPOTS))
    assert await run(server, "fences", "import", str(geojson)) == 0
    assert "imported 2 fences (created 2, replaced 0)" in capsys.readouterr().out
    await run(server, "fences", "list", "--label", "depot")
    assert capsys.readouterr().out == "depot\tcircle\tv1\tdepot\tDepot\n"
    raised = await enter_then_exit(server, channel, "van-1")
    for _ in range(50):  # the event store writes in the background
        await run(server, "fences", "events", "--device", "van-1")
        lines = capsys.readouterr().out.splitlines()
        if len(lines) == 2:
            break
        await asyncio.sleep(0.1)
    assert [line.split("\t")[2] for line in lines] == ["ENTER", "EXIT"]
    assert [line.split("\t")[0] for line in lines] == [
        utc_text(event.time_ms) for event in raised
    ]
    for _ in range(50):  # its activity events, when asked for
        await run(server, "fences", "events", "--device", "van-1", "--type", "ONLINE")
        lines = capsys.readouterr().out.splitlines()
        if lines:
            break
        await asyncio.sleep(0.1)
    assert [line.split("\t")[2] for line in lines] == ["ONLINE"]


def utc_text(time_ms: int) -> str:
    """``2026-12-06T10:49:28.123Z``, worked out apart from the client's helper."""
    moment = datetime.fromtimestamp(time_ms // 1000, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{time_ms % 1000:03d}Z"


async def test_refused_import_prints_one_line(server, tmp_path, capsys) -> None:
    geojson = tmp_path / "points.geojson"
    point = {"type": "Point", "coordinates": [1, 2]}
    feature = {"type": "Feature", "properties": {}, "geometry": point}
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    assert await run(server, "fences", "import", str(geojson)) == 1
    assert capsys.readouterr().err.startswith("tracking: INVALID_ARGUMENT: features[0]")


async def test_a_feature_without_an_id_is_named_as_geojson_has_it(
    server, tmp_path, capsys
) -> None:
    """The fence id comes from the Feature's id or properties.id: the error names
    those, not the fence_id of the gRPC message."""
    unnamed = {**DEPOTS["features"][1]}
    del unnamed["id"]
    collection = {**DEPOTS, "features": [DEPOTS["features"][0], unnamed]}
    geojson = tmp_path / "unnamed.geojson"
    geojson.write_text(json.dumps(collection))
    assert await run(server, "fences", "import", str(geojson)) == 1
    assert capsys.readouterr().err.startswith(
        "tracking: INVALID_ARGUMENT: features[1].id: missing "
        '(set the Feature\'s "id" or properties.id)'
    )


async def test_a_setting_out_of_range_is_named_as_geojson_has_it(
    server, tmp_path, capsys
) -> None:
    """A dwell_ms read from properties is named there, not as the gRPC message's
    fence setting (features[1].dwell_ms)."""
    slow = {**DEPOTS["features"][1], "properties": {"dwell_ms": -1}}
    collection = {**DEPOTS, "features": [DEPOTS["features"][0], slow]}
    geojson = tmp_path / "negative-dwell.geojson"
    geojson.write_text(json.dumps(collection))
    assert await run(server, "fences", "import", str(geojson)) == 1
    assert capsys.readouterr().err.startswith(
        "tracking: INVALID_ARGUMENT: features[1].properties.dwell_ms: must lie "
        "within 0 and 30 days"
    )


@pytest.mark.parametrize("since_s", ["-5", "0", "nan", "inf"])
async def test_a_bad_since_s_is_a_usage_error_naming_the_flag(
    server, since_s, capsys
) -> None:
    """Refused by the CLI before any call: not sent on to come back as a server
    field (``end_ms: must lie after start_ms``) the user never set."""
    with pytest.raises(SystemExit) as exited:
        await run(server, "fences", "events", "--since-s", since_s)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --since-s: must be a number above 0" in err
    assert "_ms" not in err


async def test_missing_import_file_is_one_readable_error(server, tmp_path) -> None:
    with pytest.raises(InvalidArgument) as error:
        await run(server, "fences", "import", str(tmp_path / "nope.geojson"))
    assert (error.value.field, "no such file" in error.value.reason) == ("file", True)


async def test_an_import_path_that_is_no_file_is_not_called_missing(
    server, tmp_path
) -> None:
    with pytest.raises(InvalidArgument) as error:
        await run(server, "fences", "import", str(tmp_path))
    assert error.value.field == "file"
    assert f"GeoJSON file: not a regular file: {tmp_path}" == error.value.reason


async def test_import_without_a_file_is_one_readable_error(server) -> None:
    with pytest.raises(InvalidArgument) as error:
        await run(server, "fences", "import")
    assert error.value.field == "file"


async def test_unreachable_server_prints_one_line(start_server, capsys) -> None:
    gone = await start_server()
    await gone.stop(0)
    assert await run(gone, "fences", "list") == 1
    assert capsys.readouterr().err.startswith("tracking: UNAVAILABLE: ")
