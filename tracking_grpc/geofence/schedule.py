"""Active schedules: is a fence active at each of an array of fix times?

>>> from tracking_grpc.geofence.model import Schedule, ScheduleWindow
>>> weekdays = Schedule("Europe/London", (ScheduleWindow(frozenset({1}), 540, 1020),))
>>> monday_8_and_9 = np.array([1_704_700_800_000, 1_704_704_400_000])
>>> active(weekdays, monday_8_and_9).tolist()
[False, True]
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np

from tracking_grpc.errors import InvalidArgument
from tracking_grpc.geofence.model import Schedule
from tracking_grpc.timestamps import check_time_zone

DAY_MS = 86_400_000
_BUCKET_MS = 900_000  # offsets change on quarter hours at most


def check(schedule: Schedule, field: str) -> None:
    """InvalidArgument unless the time zone exists and every window is in range."""
    check_time_zone(schedule.timezone, f"{field}.timezone")
    if not schedule.windows:
        raise InvalidArgument(
            f"{field}.windows", "a schedule needs at least one window"
        )
    for i, window in enumerate(schedule.windows):
        where = f"{field}.windows[{i}]"
        if not (0 <= window.start_minute < 1440 and 0 <= window.end_minute <= 1440):
            raise InvalidArgument(where, "minutes must lie within 0..1440")
        if any(not 1 <= day <= 7 for day in window.days):
            raise InvalidArgument(f"{where}.days", "weekdays are 1 (Monday) to 7")


def active(schedule: Schedule, time_ms: np.ndarray) -> np.ndarray:
    """True where the fix time falls in one of the schedule's local windows."""
    zone = ZoneInfo(schedule.timezone)
    buckets, where = np.unique(time_ms // _BUCKET_MS, return_inverse=True)
    offsets = np.array([_utc_offset_s(zone, int(b)) for b in buckets])
    local_ms = time_ms + (offsets[where] * 1000).astype(np.int64)
    day = local_ms // DAY_MS
    weekday = (day + 3) % 7 + 1  # 1970-01-01 was a Thursday
    minute = (local_ms % DAY_MS) // 60_000
    result = np.zeros(time_ms.shape, dtype=bool)
    for window in schedule.windows:
        days = np.array(sorted(window.days or range(1, 8)))
        start, end = window.start_minute, window.end_minute
        on_day = np.isin(weekday, days)
        if start < end:
            result |= on_day & (minute >= start) & (minute < end)
        elif start == end:
            result |= on_day
        else:
            yesterday = np.isin((weekday + 5) % 7 + 1, days)
            result |= (on_day & (minute >= start)) | (yesterday & (minute < end))
    return result


def _utc_offset_s(zone: ZoneInfo, bucket: int) -> float:
    """The zone's offset from UTC at the start of a quarter-hour bucket, in seconds."""
    offset = zone.utcoffset(datetime.fromtimestamp(bucket * 900, UTC))
    if offset is None:  # never for a ZoneInfo, but tzinfo.utcoffset may return None
        raise ValueError(f"time zone {zone.key} has no UTC offset")
    return offset.total_seconds()
