"""Text timestamps to milliseconds since the Unix epoch, a whole column at a time.

Supported forms: ISO 8601 (``2020-06-30T00:00:00``, ``2026-01-26 15:57:02``, fractional
seconds, a trailing ``Z`` or ``+02:00``), Unix seconds or milliseconds, and any
``strptime`` pattern. Times without an offset are read in a given IANA time zone.

>>> parse_times(["2020-06-30T00:00:00Z", "2020-06-30 00:00:01.5"], "iso").tolist()
[1593475200000, 1593475201500]
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from functools import cache
from zoneinfo import ZoneInfo, available_timezones

import numpy as np

from tracking_grpc.errors import InvalidArgument

MS_PER_HOUR = 3_600_000
# 9999-01-01T00:00Z, the latest time a request may name: local calendar days of a
# range ending by then, in any time zone, stay within the years datetime can name,
# and milliseconds added to it stay far from the int64 limit.
LATEST_MS = 253_370_764_800_000
TIME_FORMATS = ("iso", "unix_s", "unix_ms")


def parse_times(
    texts: Sequence[str] | np.ndarray, time_format: str = "iso", time_zone: str = "UTC"
) -> np.ndarray:
    """Parse a column of timestamps into int64 milliseconds (UTC)."""
    values = np.asarray(texts, dtype=str)
    if values.size == 0:
        return np.empty(0, dtype=np.int64)
    if time_format == "unix_s":
        return np.round(_numbers(values, "time") * 1000.0).astype(np.int64)
    if time_format == "unix_ms":
        return np.round(_numbers(values, "time")).astype(np.int64)
    if time_format == "iso":
        return _parse_iso(np.char.strip(values), time_zone)
    return _parse_pattern(values, time_format, time_zone)


def local_to_utc_ms(local_ms: np.ndarray, time_zone: str) -> np.ndarray:
    """Wall-clock milliseconds in ``time_zone`` to UTC milliseconds.

    Offsets are looked up once per distinct hour; only the rare hours in which the
    zone's offset changes (daylight saving) are resolved fix by fix. An ambiguous
    wall time (the repeated hour in autumn) is read as its first occurrence.
    """
    if time_zone in ("UTC", "Etc/UTC", "Z"):
        return local_ms
    zone = _zone(time_zone)
    hours, inverse = np.unique(local_ms // MS_PER_HOUR, return_inverse=True)
    start = np.array([_offset_ms(int(h) * MS_PER_HOUR, zone) for h in hours])
    end = np.array([_offset_ms(int(h + 1) * MS_PER_HOUR - 1, zone) for h in hours])
    offsets = start[inverse]
    changing = np.flatnonzero((start != end)[inverse])
    for i in changing:
        offsets[i] = _offset_ms(int(local_ms[i]), zone)
    return local_ms - offsets


def _offset_ms(local_ms: int, zone: ZoneInfo) -> int:
    wall = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=local_ms)
    offset = wall.replace(tzinfo=zone).utcoffset()
    return int(offset.total_seconds() * 1000) if offset else 0


def check_time_zone(name: str, where: str) -> str:
    """``name`` if it is an IANA time zone; InvalidArgument on ``where`` if not.

    ``localtime`` (whatever zone the server's machine is set to) and the ``right/``
    zones (which count leap seconds, as Unix times do not) open as zones too, but
    would make the same request mean different times on different servers.
    """
    if name == "localtime" or name not in _iana_zones():
        try:
            ZoneInfo(name)
        except (KeyError, ValueError, OSError) as exc:  # OSError: name too long
            raise InvalidArgument(
                where, f"unknown IANA time zone {name[:64]!r}"
            ) from exc
        raise InvalidArgument(
            where, f"{name!r} is not an IANA time zone name such as Europe/Berlin"
        )
    return name


@cache
def _iana_zones() -> frozenset[str]:
    return frozenset(available_timezones())


def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(check_time_zone(name, "time_zone"))


def _numbers(values: np.ndarray, field: str) -> np.ndarray:
    try:
        return values.astype(np.float64)
    except ValueError as exc:
        raise InvalidArgument(field, f"not a number: {exc}") from exc


def _parse_iso(values: np.ndarray, time_zone: str) -> np.ndarray:
    values, offset_ms, has_offset = _split_offsets(values)
    try:
        naive_us = values.astype("datetime64[us]").astype(np.int64)
    except ValueError as exc:
        raise InvalidArgument("time", f"not an ISO 8601 time: {exc}") from exc
    naive = (naive_us + 500) // 1000
    if has_offset.all():
        return naive - offset_ms
    local = local_to_utc_ms(naive, time_zone)
    return np.where(has_offset, naive - offset_ms, local)


def _split_offsets(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Strip ``Z`` and ``±HH:MM`` suffixes; numpy refuses to parse them."""
    zulu = np.strings.endswith(values, "Z")
    values = np.where(zulu, np.strings.rstrip(values, "Z"), values)
    tail = np.strings.slice(values, -6, None)
    sign = np.strings.slice(tail, 0, 1)
    numeric = (
        (np.strings.str_len(values) >= 16)
        & ((sign == "+") | (sign == "-"))
        & (np.strings.slice(tail, 3, 4) == ":")
    )
    offset_ms = np.zeros(values.shape, dtype=np.int64)
    if numeric.any():
        hours = np.strings.slice(tail[numeric], 1, 3).astype(np.int64)
        minutes = np.strings.slice(tail[numeric], 4, 6).astype(np.int64)
        signs = np.where(sign[numeric] == "-", -1, 1)
        offset_ms[numeric] = signs * (hours * 60 + minutes) * 60_000
        values = np.where(numeric, np.strings.slice(values, 0, -6), values)
    return values, offset_ms, zulu | numeric


def _parse_pattern(values: np.ndarray, pattern: str, time_zone: str) -> np.ndarray:
    """Any ``strptime`` pattern; one call per distinct text (not vectorised)."""
    unique, inverse = np.unique(values, return_inverse=True)
    parsed = np.empty(unique.shape, dtype=np.int64)
    aware = np.zeros(unique.shape, dtype=bool)
    epoch = dt.datetime(1970, 1, 1)
    for i, text in enumerate(unique):
        try:
            stamp = dt.datetime.strptime(str(text), pattern)
        except ValueError as exc:
            raise InvalidArgument(
                "time", f"{text!r} does not match {pattern!r}"
            ) from exc
        if stamp.tzinfo is not None:
            aware[i] = True
            stamp = stamp.astimezone(dt.UTC).replace(tzinfo=None)
        parsed[i] = (stamp - epoch) // dt.timedelta(milliseconds=1)
    utc = np.where(aware, parsed, local_to_utc_ms(parsed, time_zone))
    return utc[inverse]
