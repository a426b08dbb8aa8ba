"""Trace readers against the real files in ../shared/data/traces and small CSVs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TRACES, require_shared
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.timestamps import parse_times
from tracking_grpc.traces import CsvFormat, detect_format, read_csv, read_trace

BUS = "liverpool_bus_route14_outbound.csv"
AIS = "nyharbor_ais_2020-06-30_first_hour.csv"
CAR = "gpxpy_around-visnjan-with-car.gpx"
POSMO = "trackintel_posmo_trajectory.csv"
PORTO = "porto_taxi_test320.csv"


def utc_ms(text: str) -> int:
    return int(parse_times([text])[0])


def fix_of(trace, device: str, seq: int) -> dict:
    (i,) = np.flatnonzero((trace.device == device) & (trace.seq == seq))
    return {
        name: getattr(trace, name)[i].item()
        for name in ("time_ms", "lat", "lon", "speed_mps", "heading_deg")
    }


@pytest.fixture(scope="module")
def traces() -> dict:
    return {
        name: read_trace(require_shared(TRACES / name))
        for name in (BUS, AIS, CAR, POSMO, PORTO)
    }


@pytest.mark.parametrize(
    ("name", "kind", "fixes", "devices"),
    [
        pytest.param(BUS, "bus", 1533, 8, id="liverpool-bus"),
        pytest.param(AIS, "ais", 8689, 295, id="nyharbor-ais"),
        pytest.param(CAR, "gpx", 104, 1, id="visnjan-car-gpx"),
        pytest.param(POSMO, "posmo", 1327, 1, id="posmo-phone"),
        pytest.param(PORTO, "porto", 14438, 244, id="porto-taxi"),
    ],
)
def test_real_trace_counts(traces, name, kind, fixes, devices):
    trace = traces[name]
    assert detect_format(TRACES / name) == kind
    assert (len(trace), len(trace.devices())) == (fixes, devices)


@pytest.mark.parametrize("name", [BUS, AIS, CAR, POSMO, PORTO])
def test_sorted_by_time_with_seq_per_device_in_time_order(traces, name):
    trace = traces[name]
    assert np.all(np.diff(trace.time_ms) >= 0)
    for device in trace.devices():
        seq = trace.seq[trace.device == device]
        assert seq.tolist() == list(range(1, len(seq) + 1)), device


def test_bus_first_fix_and_empty_bearing(traces):
    fix = fix_of(traces[BUS], "4716", 1)
    assert fix["time_ms"] == utc_ms("2026-01-26T15:57:02Z")
    assert (fix["lat"], fix["lon"]) == (53.44451, -2.925173)
    assert np.isnan(fix["heading_deg"])
    assert fix_of(traces[BUS], "4716", 2)["heading_deg"] == 53.0


def test_ais_knots_to_mps_and_negative_course_wrapped(traces):
    fix = fix_of(traces[AIS], "366999618", 1)
    assert fix["time_ms"] == utc_ms("2020-06-30T00:00:00Z")
    assert (fix["lat"], fix["lon"]) == (40.54291, -74.02433)
    assert fix["speed_mps"] == pytest.approx(19.0 * 1852 / 3600, rel=1e-6)
    assert fix["heading_deg"] == pytest.approx(360 - 61.8, abs=1e-4)


def test_ais_keeps_repeated_reports_as_separate_seqs(traces):
    trace = traces[AIS]
    pairs = np.unique(np.char.add(trace.device.astype(str), trace.time_ms.astype(str)))
    assert len(trace) - len(pairs) == 2


def test_gpx_time_and_elevation(traces):
    trace = traces[CAR]
    assert trace.devices() == ["gpxpy_around-visnjan-with-car"]
    assert trace.time_ms[0] == utc_ms("2020-12-18T06:15:50Z")
    assert trace.time_ms[-1] == utc_ms("2020-12-18T06:24:24Z")
    assert (trace.lat[0], trace.altitude_m[0]) == (45.2735188510, np.float32(211.15))


def test_posmo_local_zurich_time_sorted_and_zero_accuracy_missing(traces):
    trace = traces[POSMO]
    assert trace.time_ms[0] == utc_ms("2019-01-25T19:00:16.179Z")
    assert trace.time_ms[-1] == utc_ms("2019-01-25T19:52:13Z")
    assert np.array_equal(trace.seq, np.arange(1, 1328))
    assert int(np.isnan(trace.accuracy_m).sum()) == 149
    assert np.nanmin(trace.accuracy_m) > 0


def test_porto_fix_k_at_start_plus_15k_seconds(traces):
    trace = traces[PORTO]
    taxi = trace.take(trace.device == "20000542")
    start = np.flatnonzero(taxi.time_ms == 1408039037_000)[0]
    assert (taxi.lat[start], taxi.lon[start]) == (41.148522, -8.585676)
    assert taxi.time_ms[start + 10] == 1408039037_000 + 150_000
    assert (taxi.lat[start + 10], taxi.lon[start + 10]) == (41.146623, -8.584884)


def test_trace_to_fix_batch(traces):
    batch = traces[BUS].to_batch("t1")
    assert len(batch) == 1533 and batch.tenant == "t1"
    assert batch.seq.dtype == np.uint64 and np.isnan(batch.battery_pct).all()


@pytest.mark.parametrize(
    ("text", "fmt", "expected_ms"),
    [
        pytest.param(
            "d;t;y;x\na;1700000000;1;2\n",
            CsvFormat(
                device="d",
                time="t",
                lat="y",
                lon="x",
                delimiter=";",
                time_format="unix_s",
            ),
            1700000000_000,
            id="unix-seconds-semicolon",
        ),
        pytest.param(
            "t,lat,lon\n2024-07-01 14:00:00,1,2\n",
            CsvFormat(time="t", lat="lat", lon="lon", time_zone="Europe/Berlin"),
            utc_ms("2024-07-01T12:00:00Z"),
            id="local-summer-time",
        ),
        pytest.param(
            "t,lat,lon\n01/07/2024 14:00,1,2\n",
            CsvFormat(time="t", lat="lat", lon="lon", time_format="%d/%m/%Y %H:%M"),
            utc_ms("2024-07-01T14:00:00Z"),
            id="strptime-pattern",
        ),
        pytest.param(
            "t,lat,lon\n2024-07-01T14:00:00+02:00,1,2\n",
            CsvFormat(time="t", lat="lat", lon="lon", time_zone="Asia/Tokyo"),
            utc_ms("2024-07-01T12:00:00Z"),
            id="explicit-offset-wins",
        ),
    ],
)
def test_csv_time_formats(tmp_path, text, fmt, expected_ms):
    path = tmp_path / "trace.csv"
    path.write_text(text)
    assert read_csv(path, fmt).time_ms.tolist() == [expected_ms]


def test_csv_units_missing_values_and_default_device(tmp_path):
    path = tmp_path / "boat.csv"
    path.write_text(
        "t,lat,lon,sog,alt\n2024-01-01T00:00:01,1,2,10,NA\n2024-01-01T00:00:00,1,2,,5\n"
    )
    fmt = CsvFormat(
        time="t", lat="lat", lon="lon", speed="sog", altitude="alt", speed_unit="kmh"
    )
    trace = read_csv(path, fmt)
    assert trace.devices() == ["boat"] and trace.seq.tolist() == [1, 2]
    assert np.isnan(trace.speed_mps[0]) and trace.speed_mps[1] == pytest.approx(
        10 / 3.6
    )
    assert trace.altitude_m[0] == 5 and np.isnan(trace.altitude_m[1])


def test_csv_rows_without_position_are_dropped(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("t,lat,lon\n2024-01-01T00:00:00,,2\n2024-01-01T00:00:01,1,2\n")
    assert len(read_csv(path, CsvFormat(time="t", lat="lat", lon="lon"))) == 1


@pytest.mark.parametrize(
    ("fmt", "field"),
    [
        pytest.param(
            CsvFormat(time="when", lat="lat", lon="lon"),
            "time",
            id="missing-time-column",
        ),
        pytest.param(
            CsvFormat(time="t", lat="lat", lon="lon", time_format="unix_s"),
            "time",
            id="text-as-unix-seconds",
        ),
        pytest.param(
            CsvFormat(time="t", lat="lat", lon="lon", time_zone="Mars/Olympus"),
            "time_zone",
            id="unknown-zone",
        ),
    ],
)
def test_csv_errors_name_the_field(tmp_path, fmt, field):
    path = tmp_path / "bad.csv"
    path.write_text("t,lat,lon\n2024-01-01 00:00:00,1,2\n")
    with pytest.raises(InvalidArgument) as error:
        read_csv(path, fmt)
    assert error.value.field == field


def test_unknown_speed_unit_is_refused():
    with pytest.raises(InvalidArgument, match="speed_unit"):
        CsvFormat(time="t", lat="y", lon="x", speed_unit="furlongs")


def test_capped_gaps_keep_order_and_short_steps(traces):
    trace = traces[PORTO].with_gaps_capped(60_000)
    steps = np.diff(trace.time_ms)
    assert steps.min() >= 0 and steps.max() == 60_000
    assert trace.duration_ms() < 24 * 3600_000 < traces[PORTO].duration_ms()
    original = np.diff(traces[PORTO].time_ms)
    assert np.array_equal(steps[original <= 60_000], original[original <= 60_000])


def test_a_device_id_renames_a_one_device_file_with_a_device_column():
    trace = read_trace(require_shared(TRACES / POSMO), device_id="posmo-k9")
    assert set(trace.device.tolist()) == {"posmo-k9"}
    assert len(trace.time_ms) == 1327
    with pytest.raises(InvalidArgument) as raised:
        read_trace(require_shared(TRACES / AIS), device_id="boat")
    assert raised.value.field == "device_id"
    assert "devices; a device id renames a file of one" in raised.value.reason
