"""Column-wise timestamp parsing: ISO forms, offsets, zones, daylight saving."""

from __future__ import annotations

import pytest

from tracking_grpc.errors import InvalidArgument
from tracking_grpc.timestamps import check_time_zone, parse_times

NOON_UTC_MS = 1_719_835_200_000  # 2024-07-01T12:00:00Z


@pytest.mark.parametrize(
    ("text", "time_format", "zone"),
    [
        pytest.param("2024-07-01T12:00:00Z", "iso", "UTC", id="iso-zulu"),
        pytest.param("2024-07-01 12:00:00", "iso", "UTC", id="space-separated"),
        pytest.param("2024-07-01T14:00:00+02:00", "iso", "UTC", id="plus-offset"),
        pytest.param("2024-07-01T10:30:00-01:30", "iso", "UTC", id="minus-offset"),
        pytest.param("2024-07-01 14:00:00", "iso", "Europe/Zurich", id="local-cest"),
        pytest.param("2024-07-01 11:59:59.9996", "iso", "UTC", id="rounds-to-ms"),
        pytest.param("1719835200", "unix_s", "UTC", id="unix-seconds"),
        pytest.param("1719835200000", "unix_ms", "UTC", id="unix-ms"),
        pytest.param(
            "01.07.2024 14:00", "%d.%m.%Y %H:%M", "Europe/Paris", id="pattern"
        ),
    ],
)
def test_one_instant_in_many_forms(text, time_format, zone):
    assert parse_times([text], time_format, zone).tolist() == [NOON_UTC_MS]


@pytest.mark.parametrize(
    ("local", "offset_h"),
    [
        pytest.param("2024-03-31 01:59:59", 1, id="before-spring-change"),
        pytest.param("2024-03-31 03:00:00", 2, id="after-spring-change"),
        pytest.param("2024-10-27 02:30:00", 2, id="repeated-hour-first-occurrence"),
        pytest.param("2024-10-27 03:00:00", 1, id="after-autumn-change"),
    ],
)
def test_daylight_saving_changes_in_zurich(local, offset_h):
    utc = parse_times([local], "iso", "UTC")[0]
    assert parse_times([local], "iso", "Europe/Zurich")[0] == utc - offset_h * 3_600_000


def test_mixed_offsets_in_one_column():
    texts = ["2024-07-01T12:00:00Z", "2024-07-01 14:00:00", "2024-07-01T13:00+01:00"]
    assert parse_times(texts, "iso", "Europe/Zurich").tolist() == [NOON_UTC_MS] * 3


def test_garbage_names_the_time_field():
    with pytest.raises(InvalidArgument) as error:
        parse_times(["yesterday"], "iso")
    assert error.value.field == "time"


@pytest.mark.parametrize("name", ["UTC", "Europe/Berlin", "America/Argentina/Salta"])
def test_iana_time_zones_are_taken(name):
    assert check_time_zone(name, "time_zone") == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        pytest.param("Mars/Base", "unknown IANA time zone", id="unknown"),
        pytest.param("", "unknown IANA time zone", id="empty"),
        # Longer than a file name may be: the zone file lookup raised OSError.
        pytest.param("x" * 256, "unknown IANA time zone", id="too-long"),
        pytest.param("Europe/" + "y" * 300, "unknown IANA time zone", id="long-path"),
        # Both open as zones on Linux, but mean the server machine's own zone, or
        # count leap seconds that Unix times leave out.
        pytest.param("localtime", "is not an IANA time zone name", id="localtime"),
        pytest.param("right/UTC", "is not an IANA time zone name", id="leap-seconds"),
    ],
)
def test_other_time_zone_names_are_refused(name, reason):
    with pytest.raises(InvalidArgument) as error:
        check_time_zone(name, "schedule.timezone")
    assert error.value.field == "schedule.timezone"
    assert reason in str(error.value)
