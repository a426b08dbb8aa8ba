"""Recorded GPS traces read into fix columns: GPX, CSV and presets for known files.

Every reader returns a :class:`Trace`: one row per fix, sorted by fix time, with
per-device sequence numbers 1..n in fix-time order (the order a device would have
produced them). Columns are numpy arrays that :class:`FixBatch` takes as they are.

>>> trace = read_trace(TRACES / "gpxpy_around-visnjan-with-car.gpx")  # doctest: +SKIP
>>> len(trace), trace.devices()  # doctest: +SKIP
(104, ['gpxpy_around-visnjan-with-car'])
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.timestamps import TIME_FORMATS, parse_times

log = logging.getLogger(__name__)

TRACE_COLUMNS = ("accuracy_m", "altitude_m", "speed_mps", "heading_deg")
SPEED_UNITS_MPS = {"mps": 1.0, "kmh": 1 / 3.6, "knots": 1852 / 3600, "mph": 0.44704}
MISSING_TEXT = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None")
PORTO_INTERVAL_MS = 15_000


@dataclass(frozen=True, slots=True)
class Trace:
    """Fixes of one or more devices, sorted by fix time; NaN marks a missing value."""

    device: np.ndarray  # object array of device ids
    seq: np.ndarray  # uint64, 1..n per device in fix-time order
    time_ms: np.ndarray  # int64, fix time
    lat: np.ndarray  # float64
    lon: np.ndarray  # float64
    accuracy_m: np.ndarray  # float32
    altitude_m: np.ndarray  # float32
    speed_mps: np.ndarray  # float32
    heading_deg: np.ndarray  # float32

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    def devices(self) -> list[str]:
        """Device ids, sorted."""
        return sorted(set(self.device.tolist()))

    def duration_ms(self) -> int:
        return int(self.time_ms[-1] - self.time_ms[0]) if len(self) else 0

    def shifted(self, offset_ms: int) -> Trace:
        """The same fixes with every fix time moved by ``offset_ms``."""
        return replace(self, time_ms=self.time_ms + np.int64(offset_ms))

    def with_gaps_capped(self, max_gap_ms: int) -> Trace:
        """Shorten every pause between consecutive fixes (of any device) to at most
        ``max_gap_ms``; order, equal times and shorter spacing are kept.

        Makes a trace of trips spread over months (Porto taxis) replayable as live.
        """
        if len(self) < 2:
            return self
        steps = np.minimum(np.diff(self.time_ms), max_gap_ms)
        time_ms = self.time_ms[0] + np.r_[0, np.cumsum(steps)]
        return replace(self, time_ms=time_ms.astype(np.int64))

    def take(self, index: np.ndarray) -> Trace:
        """Rows selected by an integer index or a boolean mask."""
        return Trace(**{name: getattr(self, name)[index] for name in _FIELDS})

    def to_batch(self, tenant: str) -> FixBatch:
        """The fixes as a :class:`FixBatch` of one tenant."""
        return FixBatch.from_columns(
            tenant,
            self.device,
            self.seq,
            self.time_ms,
            self.lat,
            self.lon,
            **{name: getattr(self, name) for name in TRACE_COLUMNS},
        )


_FIELDS = ("device", "seq", "time_ms", "lat", "lon", *TRACE_COLUMNS)


def build_trace(
    device: np.ndarray,
    time_ms: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    **optional: np.ndarray | None,
) -> Trace:
    """Sort fixes by time and number them 1..n per device in fix-time order.

    Fixes of one device with equal times keep their input order.
    """
    device = np.asarray(device, dtype=object)
    time_ms = np.asarray(time_ms, dtype=np.int64)
    n = time_ms.shape[0]
    names, codes = np.unique(device.astype(str), return_inverse=True)
    rows = np.arange(n)

    by_device = np.lexsort((rows, time_ms, codes))
    first = np.searchsorted(codes[by_device], codes[by_device], side="left")
    seq = np.empty(n, dtype=np.uint64)
    seq[by_device] = rows - first + 1

    order = np.lexsort((seq, codes, time_ms))
    columns = {
        name: _float32_or_nan(optional.get(name), n)[order] for name in TRACE_COLUMNS
    }
    return Trace(
        device=names.astype(object)[codes][order],
        seq=seq[order],
        time_ms=time_ms[order],
        lat=np.asarray(lat, dtype=np.float64)[order],
        lon=np.asarray(lon, dtype=np.float64)[order],
        **columns,
    )


def _float32_or_nan(values: np.ndarray | None, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan, dtype=np.float32)
    return np.asarray(values, dtype=np.float32)


# --- CSV --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CsvFormat:
    """Where a CSV file keeps each fix field, and how values are written.

    ``device`` names the device-id column; when it is None every row belongs to
    the device id given to :func:`read_csv` (default: the file's stem).
    ``time_format`` is ``iso``, ``unix_s``, ``unix_ms`` or a ``strptime`` pattern;
    times without an offset are read in ``time_zone``. ``missing`` maps a column
    to extra values that mean "not available" (for example AIS heading 511).
    """

    time: str
    lat: str
    lon: str
    device: str | None = None
    accuracy: str | None = None
    altitude: str | None = None
    speed: str | None = None
    heading: str | None = None
    delimiter: str = ","
    time_format: str = "iso"
    time_zone: str = "UTC"
    speed_unit: str = "mps"
    missing: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.speed_unit not in SPEED_UNITS_MPS:
            units = ", ".join(SPEED_UNITS_MPS)
            raise InvalidArgument("speed_unit", f"expected one of {units}")
        if len(self.delimiter) != 1:
            raise InvalidArgument("delimiter", "must be one character")


PRESETS: dict[str, CsvFormat] = {
    # Liverpool buses (BODS): bearing is empty when the bus has not moved yet.
    "bus": CsvFormat(
        device="vehicle_id",
        time="timestamp",
        lat="latitude",
        lon="longitude",
        heading="bearing",
    ),
    # Marine AIS: COG is the course over ground (360 = not available; this file
    # also writes courses as negative angles); SOG 102.3 knots = not available;
    # the vessel's true heading (Heading, 511 = not available) is not a course.
    "ais": CsvFormat(
        device="MMSI",
        time="BaseDateTime",
        lat="LAT",
        lon="LON",
        speed="SOG",
        heading="COG",
        speed_unit="knots",
        missing={"SOG": (102.3,), "COG": (360.0,), "Heading": (511.0,)},
    ),
    # Posmo phone app: ';' separated, local Swiss time, accuracy 0 = not available.
    "posmo": CsvFormat(
        device="user_id",
        time="tracked_at",
        lat="latitude",
        lon="longitude",
        accuracy="accuracy",
        delimiter=";",
        time_zone="Europe/Zurich",
    ),
}


def read_csv(path: Path, fmt: CsvFormat, device_id: str | None = None) -> Trace:
    """Read a CSV file with a header row; rows without time or position are dropped."""
    header, columns = _read_columns(path, fmt.delimiter)
    wanted = {
        "time": fmt.time,
        "lat": fmt.lat,
        "lon": fmt.lon,
        "device": fmt.device,
        "accuracy": fmt.accuracy,
        "altitude": fmt.altitude,
        "speed": fmt.speed,
        "heading": fmt.heading,
    }
    for role, name in wanted.items():
        if name is not None and name not in header:
            raise InvalidArgument(role, f"column {name!r} not in {path.name}")
    raw = {role: columns[name] for role, name in wanted.items() if name is not None}

    n = len(raw["time"])
    present = ~(_is_missing(raw["time"]) | _is_missing(raw["lat"]))
    present &= ~_is_missing(raw["lon"])
    if fmt.device is None:
        device = np.full(n, device_id or path.stem, dtype=object)
    else:
        device = raw["device"].astype(object)
        present &= ~_is_missing(raw["device"])
        if device_id is not None:
            device = _renamed(device, present, device_id, path.name)
    if not present.all():
        log.info(
            "%s: %d rows without time or position dropped", path.name, n - present.sum()
        )

    def numbers(role: str) -> np.ndarray | None:
        if role not in raw:
            return None
        name = str(wanted[role])
        return _to_float(raw[role][present], name, fmt.missing.get(name, ()))

    speed = numbers("speed")
    heading = numbers("heading")
    accuracy = numbers("accuracy")
    return build_trace(
        device[present],
        parse_times(raw["time"][present], fmt.time_format, fmt.time_zone),
        _to_float(raw["lat"][present], fmt.lat),
        _to_float(raw["lon"][present], fmt.lon),
        speed_mps=None if speed is None else speed * SPEED_UNITS_MPS[fmt.speed_unit],
        heading_deg=None if heading is None else np.mod(heading, 360.0),
        accuracy_m=None
        if accuracy is None
        else np.where(accuracy > 0, accuracy, np.nan),
        altitude_m=numbers("altitude"),
    )


def _read_columns(
    path: Path, delimiter: str
) -> tuple[list[str], dict[str, np.ndarray]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise InvalidArgument("file", f"{path.name} is empty")
        rows = [row for row in reader if row]
    width = len(header)
    if any(len(row) != width for row in rows):
        raise InvalidArgument("file", f"{path.name}: rows differ in length from header")
    by_column = list(zip(*rows, strict=True)) if rows else [()] * width
    return header, {
        name: np.array(values, dtype=str)
        for name, values in zip(header, by_column, strict=True)
    }


def _is_missing(values: np.ndarray) -> np.ndarray:
    return np.isin(np.strings.strip(values), MISSING_TEXT)


def _to_float(
    values: np.ndarray, column: str, missing: tuple[float, ...] = ()
) -> np.ndarray:
    text = np.where(_is_missing(values), "nan", values)
    try:
        numbers = text.astype(np.float64)
    except ValueError as exc:
        raise InvalidArgument(column, f"not a number: {exc}") from exc
    if missing:
        numbers[np.isin(numbers, missing)] = np.nan
    return numbers


# --- GPX --------------------------------------------------------------------------


def _renamed(
    device: np.ndarray, present: np.ndarray, device_id: str, name: str
) -> np.ndarray:
    """A file of one device, stored under ``device_id`` instead of its own id."""
    found = np.unique(device[present].astype(str))
    if len(found) > 1:
        raise InvalidArgument(
            "device_id",
            f"{name} holds {len(found)} devices; a device id renames a file of one",
        )
    return np.full(len(device), device_id, dtype=object)


def read_gpx(path: Path, device_id: str | None = None) -> Trace:
    """Track points (``trkpt``) of every track and segment; they need a ``time``."""
    lat, lon, ele, times, speed, course = [], [], [], [], [], []
    for _, element in ET.iterparse(path, events=("end",)):
        if _local(element.tag) != "trkpt":
            continue
        values = {_local(child.tag): child.text for child in element.iter()}
        lat.append(element.get("lat", "nan"))
        lon.append(element.get("lon", "nan"))
        times.append(values.get("time") or "")
        ele.append(values.get("ele") or "nan")
        speed.append(values.get("speed") or "nan")
        course.append(values.get("course") or "nan")
        element.clear()

    time_text = np.array(times, dtype=str)
    timed = ~_is_missing(time_text) if times else np.zeros(0, dtype=bool)
    if not timed.all():
        log.info("%s: %d points without time dropped", path.name, (~timed).sum())
    n = int(timed.sum())
    return build_trace(
        np.full(n, device_id or path.stem, dtype=object),
        parse_times(time_text[timed], "iso"),
        _to_float(np.array(lat, dtype=str)[timed], "lat"),
        _to_float(np.array(lon, dtype=str)[timed], "lon"),
        altitude_m=_to_float(np.array(ele, dtype=str)[timed], "ele"),
        speed_mps=_to_float(np.array(speed, dtype=str)[timed], "speed"),
        heading_deg=_to_float(np.array(course, dtype=str)[timed], "course"),
    )


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


# --- Porto taxi trips -------------------------------------------------------------


def read_porto(path: Path) -> Trace:
    """Porto taxi trips: one row per trip, ``POLYLINE`` a JSON ``[[lon, lat], ...]``.

    Fix k of a trip was taken at ``TIMESTAMP + 15 k`` seconds; the device is the taxi.
    """
    header, columns = _read_columns(path, ",")
    for name in ("TAXI_ID", "TIMESTAMP", "POLYLINE"):
        if name not in header:
            raise InvalidArgument(name, f"column {name!r} not in {path.name}")
    polylines = columns["POLYLINE"]
    usable = ~_is_missing(polylines)
    trips = json.loads("[" + ",".join(polylines[usable].tolist()) + "]")

    counts = np.fromiter((len(trip) for trip in trips), dtype=np.intp, count=len(trips))
    points = np.array(list(itertools.chain.from_iterable(trips)), dtype=np.float64)
    points = points.reshape(-1, 2)
    start_ms = parse_times(columns["TIMESTAMP"][usable], "unix_s")

    trip_of_fix = np.repeat(np.arange(len(trips)), counts)
    k = np.arange(len(points)) - np.repeat(np.cumsum(counts) - counts, counts)
    return build_trace(
        columns["TAXI_ID"][usable].astype(object)[trip_of_fix],
        start_ms[trip_of_fix] + k * PORTO_INTERVAL_MS,
        points[:, 1],
        points[:, 0],
    )


# --- dispatch ---------------------------------------------------------------------

FORMATS = ("auto", "gpx", "csv", "bus", "ais", "posmo", "porto")


def detect_format(path: Path) -> str:
    """Guess a reader from the extension and the CSV header."""
    if path.suffix.lower() == ".gpx":
        return "gpx"
    with path.open(encoding="utf-8-sig") as handle:
        header = handle.readline()
    names = {name.strip().strip('"') for name in header.replace(";", ",").split(",")}
    if {"TAXI_ID", "POLYLINE"} <= names:
        return "porto"
    for preset, fmt in PRESETS.items():
        if {fmt.time, fmt.lat, fmt.lon, fmt.device} <= names:
            return preset
    return "csv"


def read_trace(
    path: Path,
    fmt: str = "auto",
    csv_format: CsvFormat | None = None,
    device_id: str | None = None,
) -> Trace:
    """Read any supported trace; ``csv`` needs ``csv_format``."""
    path = Path(path)
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "gpx":
        return read_gpx(path, device_id)
    if kind == "porto":
        return read_porto(path)
    if kind in PRESETS:
        return read_csv(path, PRESETS[kind], device_id)
    if kind == "csv":
        if csv_format is None:
            raise InvalidArgument("format", "csv needs the time, lat and lon columns")
        return read_csv(path, csv_format, device_id)
    raise InvalidArgument("format", f"expected one of {', '.join(FORMATS)}")


__all__ = [
    "FORMATS",
    "PRESETS",
    "TIME_FORMATS",
    "TRACE_COLUMNS",
    "CsvFormat",
    "Trace",
    "build_trace",
    "read_csv",
    "read_gpx",
    "read_porto",
    "read_trace",
]
