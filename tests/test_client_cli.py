"""Client subcommands as a user runs them, against a real server on port 0."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import pytest

from tests.conftest import TRACES, require_shared
from tracking_grpc.client.channel import (
    UNREACHABLE_AFTER_S,
    open_channel,
    saying_when_unreachable,
)
from tracking_grpc.client.commands import add_client_parsers
from tracking_grpc.errors import InvalidArgument

CAR = "gpxpy_around-visnjan-with-car.gpx"
CAR_DEVICE = "gpxpy_around-visnjan-with-car"
CAR_LAST = (45.2733349521, 13.7139970623)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tracking")
    add_client_parsers(parser.add_subparsers(required=True))
    return parser.parse_args(argv)


async def run(server, *argv: str) -> int:
    args = parse(*argv, "--target", f"127.0.0.1:{server.port}")
    return await args.command(args)


async def test_replay_prints_a_summary(server, capsys):
    car = str(require_shared(TRACES / CAR))
    assert await run(server, "replay", car, "--fast") == 0
    out = capsys.readouterr().out
    assert f"replayed {CAR}: 1 devices, 104 fixes in the trace, 104 sent" in out
    assert "sent 104  stored 104  duplicates 0" in out


async def test_a_replay_whose_every_fix_is_rejected_exits_1(server, capsys):
    """Original times years old are older than a default server accepts: nothing is
    stored, and the exit code says so (a script must not take it for success)."""
    car = str(require_shared(TRACES / CAR))
    assert await run(server, "replay", car, "--fast", "--original-times") == 1
    out = capsys.readouterr().out
    assert "sent 104  stored 0  duplicates 0" in out
    assert "rejected REJECT_REASON_ANCIENT_TIME: 104" in out
    assert "FAILED: the server rejected every fix sent and stored none" in out


async def test_a_replay_of_fixes_stored_before_exits_0(server, capsys):
    car = str(require_shared(TRACES / CAR))
    assert await run(server, "replay", car, "--fast") == 0
    capsys.readouterr()
    assert await run(server, "replay", car, "--fast") == 0  # all duplicates now
    assert "stored 0  duplicates 104" in capsys.readouterr().out


async def test_positions_and_nearby_after_a_replay(server, capsys):
    await run(server, "replay", str(require_shared(TRACES / CAR)), "--fast")
    capsys.readouterr()
    await run(server, "positions", CAR_DEVICE, "nobody", "--json")
    first, missing = capsys.readouterr().out.splitlines()
    assert (json.loads(first)["lat"], json.loads(first)["lon"]) == CAR_LAST
    assert missing == "no position: nobody"
    await run(server, "nearby", *map(str, CAR_LAST), "50")
    assert CAR_DEVICE in capsys.readouterr().out
    await run(server, "nearby", "0", "0", "50")
    assert capsys.readouterr().out == "no device within 50 m of 0, 0\n"
    await run(server, "nearby", "0", "0", "50", "--json")
    assert capsys.readouterr().out == ""


async def test_watch_prints_the_snapshot_as_json_lines(server, capsys):
    await run(server, "replay", str(require_shared(TRACES / CAR)), "--fast")
    capsys.readouterr()
    await run(server, "watch", "--json", "--count", "1", "--timeout", "10")
    record = json.loads(capsys.readouterr().out)
    assert record["device_id"] == CAR_DEVICE and record["snapshot"] is True


async def test_watch_stops_at_its_timeout(server, capsys):
    assert await run(server, "watch", "--device", "nobody", "--timeout", "0.3") == 0
    assert "snapshot done" in capsys.readouterr().out


async def test_missing_trace_file_is_one_readable_error(server, tmp_path):
    with pytest.raises(InvalidArgument) as error:
        await run(server, "replay", str(tmp_path / "nope.csv"))
    assert (error.value.field, "no such file" in error.value.reason) == ("file", True)


async def test_a_trace_path_that_is_no_file_is_not_called_missing(server, tmp_path):
    with pytest.raises(InvalidArgument) as error:
        await run(server, "replay", str(tmp_path))
    assert error.value.field == "file"
    assert f"trace file: not a regular file: {tmp_path}" == error.value.reason


async def test_csv_without_columns_names_the_missing_flag(server, tmp_path):
    path = tmp_path / "fixes.csv"
    path.write_text("when,y,x\n2024-01-01T00:00:00Z,1,2\n")
    with pytest.raises(InvalidArgument) as error:
        await run(server, "replay", str(path), "--format", "csv", "--lat-column", "y")
    assert error.value.field == "--time-column"


async def test_csv_with_columns_replays(server, tmp_path, capsys):
    path = tmp_path / "boat.csv"
    path.write_text("when;y;x;sog\n1700000000;1.5;2.5;10\n1700000060;1.6;2.5;11\n")
    columns = ["--time-column", "when", "--lat-column", "y", "--lon-column", "x"]
    extra = ["--speed-column", "sog", "--speed-unit", "knots", "--delimiter", ";"]
    argv = ["replay", str(path), "--format", "csv", *columns, *extra, "--fast"]
    assert await run(server, *argv, "--time-format", "unix_s") == 0
    assert "stored 2" in capsys.readouterr().out


SECRET = "client-tests-secret-of-at-least-32-bytes"


def token(role: str, sub: str) -> str:
    import time

    import jwt

    claims = {"tenant": "acme", "sub": sub, "role": role, "exp": time.time() + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
async def jwt_server(start_server):
    return await start_server(auth_mode="jwt", jwt_hs256_secret=SECRET)


async def test_replay_with_a_device_token(jwt_server, capsys):
    car = str(require_shared(TRACES / CAR))
    argv = ["replay", car, "--fast", "--token", token("device", CAR_DEVICE)]
    assert await run(jwt_server, *argv) == 0
    assert await jwt_server.app.history.count("acme") == 104
    await run(jwt_server, "positions", CAR_DEVICE, "--token", token("viewer", "ops"))
    assert CAR_DEVICE in capsys.readouterr().out.splitlines()[-1]


async def test_replay_without_a_token_fails_at_once(jwt_server, capsys):
    car = str(require_shared(TRACES / CAR))
    assert await run(jwt_server, "replay", car, "--fast") == 1
    out = capsys.readouterr().out
    assert "reconnects 0" in out
    assert f"FAILED {CAR_DEVICE}: UNAUTHENTICATED" in out


@pytest.mark.parametrize("target", ["127.0.0.1:", "localhost", "127.0.0.1:99999"])
def test_bad_target_is_a_usage_error(target, capsys):
    with pytest.raises(SystemExit):
        parse("positions", "a", "--target", target)
    assert "expected HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("replay", "t.gpx", "--speed", "-2"), "--speed"),
        (("replay", "t.gpx", "--speed", "0"), "--speed"),
        (("replay", "t.gpx", "--tick-ms", "0"), "--tick-ms"),
        (("replay", "t.gpx", "--batch-fixes", "-1"), "--batch-fixes"),
        (("replay", "t.gpx", "--window", "0"), "--window"),
        (("replay", "t.gpx", "--max-gap-s", "-1"), "--max-gap-s"),
        (("replay", "t.gpx", "--give-up-s", "nan"), "--give-up-s"),
        (("simulate", "--devices", "0"), "--devices"),
        (("simulate", "--interval", "-1"), "--interval"),
        (("simulate", "--radius-m", "-100"), "--radius-m"),
        (("watch", "--count", "0"), "--count"),
        (("watch", "--timeout", "-3"), "--timeout"),
        (("nearby", "60", "24", "-5"), "radius_m"),
        (("nearby", "60", "24", "500", "--limit", "-1"), "--limit"),
    ],
)
def test_a_number_a_flag_cannot_take_is_a_usage_error_naming_it(argv, flag, capsys):
    """Refused by argparse before any call, naming the flag, not sent on to come
    back as an error about a request field."""
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    assert f"argument {flag}: must be " in capsys.readouterr().err


async def test_unreachable_server_prints_one_line(start_server, capsys):
    gone = await start_server()
    await gone.stop(0)
    assert await run(gone, "nearby", "1", "2", "100") == 1
    assert capsys.readouterr().err.startswith("tracking: UNAVAILABLE: ")


async def test_a_replay_with_nothing_answering_says_so_while_it_retries(
    start_server, capsys
):
    """It retries for --give-up-s; the user learns at once why nothing happens."""
    car = str(require_shared(TRACES / CAR))
    gone = await start_server()
    await gone.stop(0)
    assert await run(gone, "replay", car, "--fast", "--give-up-s", "2") == 1
    err = capsys.readouterr().err
    assert err.count("nothing answers at") == 1
    assert f"127.0.0.1:{gone.port} yet; retrying for up to 2 s (--give-up-s)" in err


async def test_the_unreachable_notice_says_nothing_while_the_server_answers(
    server, capsys
):
    """The notice is for a server that does not answer: a served command, however
    long it runs, prints none."""
    target = f"127.0.0.1:{server.port}"
    async with open_channel(target) as channel:
        async with saying_when_unreachable(channel, target, 120):
            await asyncio.sleep(UNREACHABLE_AFTER_S + 0.5)
    assert capsys.readouterr().err == ""


async def test_porto_months_replay_as_live_with_capped_gaps(server, capsys):
    porto = str(require_shared(TRACES / "porto_taxi_test320.csv"))
    assert await run(server, "replay", porto, "--fast", "--max-gap-s", "60") == 0
    assert "stored 14438  duplicates 0" in capsys.readouterr().out


async def test_watch_reconnects_after_a_server_restart(start_server, capsys):
    first = await start_server()
    target = f"127.0.0.1:{first.port}"
    args = parse(
        "watch", "--json", "--count", "1", "--timeout", "30", "--target", target
    )
    watching = asyncio.create_task(args.command(args))
    await asyncio.sleep(0.5)
    await first.stop(0)
    second = await start_server(listen=target)
    await run(second, "replay", str(require_shared(TRACES / CAR)), "--fast")
    assert await asyncio.wait_for(watching, timeout=30) == 0
    out, err = capsys.readouterr()
    assert "reconnecting" in err
    (line,) = [line for line in out.splitlines() if line.startswith("{")]
    assert json.loads(line)["device_id"] == CAR_DEVICE


async def test_watch_into_a_closed_pipe_stops_without_a_traceback(server):
    # `tracking watch | head -1`: once head exits, printing raised BrokenPipeError
    # and the user saw a traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tracking_grpc",
            "watch",
            "--timeout",
            "10",
            "--target",
            f"127.0.0.1:{server.port}",
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    _, stderr = await process.communicate()
    assert process.returncode == 141
    assert b"Traceback" not in stderr


def test_an_event_line_says_when_what_where_and_the_details():
    """``replay --events`` printed the type, the device and the sequence number:
    not when the event happened, nor a trip's length or a speed."""
    from tracking.v1 import common_pb2, event_pb2

    from tracking_grpc.client.replay import event_line

    fence = event_pb2.Event(
        device_id="van-7",
        type=event_pb2.EVENT_TYPE_DWELL,
        time_ms=1_700_000_000_123,
        position=common_pb2.LatLng(lat=1.0, lon=2.0),
        fix_seq=42,
        fence_id="depot",
        attributes={"dwell_ms": "60000"},
    )
    trip = event_pb2.Event(
        device_id="van-7",
        type=event_pb2.EVENT_TYPE_TRIP_ENDED,
        time_ms=1_700_000_600_000,
        fix_seq=99,
        activity=event_pb2.ActivityDetail(
            motion=event_pb2.MOTION_STOPPED,
            distance_m=5321.04,
            duration_s=600.0,
        ),
    )
    assert event_line(fence) == (
        "event 2023-11-14T22:13:20.123Z DWELL van-7 fence=depot seq=42 dwell_ms=60000"
    )
    assert event_line(trip) == (
        "event 2023-11-14T22:23:20.000Z TRIP_ENDED van-7 seq=99 motion=stopped"
        " distance_m=5321.0 duration_s=600.0"
    )
