"""Per-fix validation on arrays: a reason code per fix, 0 for a valid fix.

Codes equal ``tracking.v1.RejectReason`` values. When a fix has several faults the
first in this order is reported: not finite, latitude range, longitude range, null
island, sequence, future time, ancient time, accuracy, other attributes.

>>> from tracking_grpc.core.fixes import FixBatch
>>> batch = FixBatch.from_rows("t", [("d", 1, 1_700_000_000_000, 91.0, 0.5)])
>>> int(reasons(batch, now_ms=1_700_000_000_000, limits=Limits())[0])
1
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from tracking_grpc.core.fixes import FixBatch

# Fix times before 2000-01-01 are never genuine: GPS week-number rollovers land in
# 1999-2003 and decoding faults in 1970.
EARLIEST_PLAUSIBLE_MS = 946_684_800_000
MAX_SEQ = 2**63 - 1  # stored as a signed 64-bit integer
NULL_ISLAND_DEG = 1e-6  # about 10 cm: what a float decoder makes of an exact 0
MAX_PROVIDER = 6  # tracking.v1.Provider.PROVIDER_MANUAL
ALTITUDE_RANGE_M = (-12_000.0, 100_000.0)  # deepest trench to the edge of space
# A fix less accurate than 1,000 km places its device nowhere in particular: ingest
# rejects it and Geofence.Check refuses such an accuracy.
MAX_ACCURACY_M = 1_000_000.0
ACCURACY_RULE = "must be in [0, 1000000] (1000 km)"  # worded for MAX_ACCURACY_M
# Rejections an ack or a PublishBatch answer lists one by one; the rest are only
# counted. 100,000 listed rejections made a 9 MB answer, over a client's 4 MB limit.
LISTED_REJECTIONS = 1_000


class Reason(enum.IntEnum):
    OK = 0
    LATITUDE_OUT_OF_RANGE = 1
    LONGITUDE_OUT_OF_RANGE = 2
    NOT_FINITE = 3
    NULL_ISLAND = 4
    FUTURE_TIME = 5
    ANCIENT_TIME = 6
    INVALID_ACCURACY = 7
    INVALID_SEQ = 8
    INVALID_ATTRIBUTE = 9


DETAILS = {
    Reason.LATITUDE_OUT_OF_RANGE: "latitude must be in [-90, 90]",
    Reason.LONGITUDE_OUT_OF_RANGE: "longitude must be in [-180, 180]",
    Reason.NOT_FINITE: "latitude and longitude must be finite numbers",
    Reason.NULL_ISLAND: "(0, 0) is a placeholder for a missing fix",
    Reason.FUTURE_TIME: "fix time is further ahead of the server clock than allowed",
    Reason.ANCIENT_TIME: "fix time is older than allowed",
    Reason.INVALID_ACCURACY: f"accuracy_m {ACCURACY_RULE}",
    Reason.INVALID_SEQ: "seq must be between 1 and 2^63-1",
    Reason.INVALID_ATTRIBUTE: (
        "speed_mps >= 0, heading_deg in [0, 360], battery_pct in [0, 100], "
        "altitude_m in [-12000, 100000], provider a defined Provider value"
    ),
}


def accuracy_refusal(accuracy: float) -> str:
    """Why an accuracy is refused, naming it as sent: ingest's rejection detail and
    the INVALID_ARGUMENT of the calls that take one (Geofence.Check, route
    matching) all say it in these words."""
    return f"{accuracy:g} {ACCURACY_RULE}"


@dataclass(frozen=True, slots=True)
class Limits:
    """How far from the server clock a fix time may be."""

    max_future_skew_ms: int = 600_000
    max_age_ms: int = 30 * 86_400_000  # 0: any age since 2000 is accepted


def _bad_optional(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Present (not NaN) values that are infinite or outside [low, high]."""
    present = ~np.isnan(values)
    with np.errstate(invalid="ignore"):
        return present & ~((values >= low) & (values <= high))


def bad_accuracy(accuracy_m: np.ndarray) -> np.ndarray:
    """Accuracies ingest rejects: given (not NaN) and infinite or outside [0,
    MAX_ACCURACY_M]; the calls that take fixes refuse the same ones."""
    return _bad_optional(accuracy_m, 0.0, MAX_ACCURACY_M)


ATTRIBUTE_RULES = (  # (column, low, high, rule) in the order they are reported
    ("speed_mps", 0.0, 1e4, "must be in [0, 10000]"),
    ("heading_deg", 0.0, 360.0, "must be in [0, 360]"),
    ("battery_pct", 0.0, 100.0, "must be in [0, 100]"),
    ("altitude_m", *ALTITUDE_RANGE_M, "must be in [-12000, 100000]"),
)


def detail(batch: FixBatch, row: int, reason: int) -> str:
    """The text of one rejection, naming the value refused (for an attribute,
    which one it was)."""
    lat, lon = float(batch.lat[row]), float(batch.lon[row])
    if reason == Reason.LATITUDE_OUT_OF_RANGE:
        return f"latitude {lat:g} must be in [-90, 90]"
    if reason == Reason.LONGITUDE_OUT_OF_RANGE:
        return f"longitude {lon:g} must be in [-180, 180]"
    if reason == Reason.NOT_FINITE:
        return f"latitude {lat:g} and longitude {lon:g} must be finite numbers"
    when = _utc_text(int(batch.time_ms[row]))
    if reason == Reason.FUTURE_TIME:
        return f"fix time {when} is further ahead of the server clock than allowed"
    if reason == Reason.ANCIENT_TIME:
        return f"fix time {when} is older than allowed"
    if reason == Reason.INVALID_ACCURACY:
        return f"accuracy_m {accuracy_refusal(float(batch.accuracy_m[row]))}"
    if reason == Reason.INVALID_SEQ:
        return f"seq {int(batch.seq[row])} must be between 1 and 2^63-1"
    if reason != Reason.INVALID_ATTRIBUTE:
        return DETAILS[Reason(reason)]
    for column, low, high, rule in ATTRIBUTE_RULES:
        value = float(getattr(batch, column)[row])
        if not np.isnan(value) and not low <= value <= high:
            return f"{column} {value:g} {rule}"
    provider = int(batch.provider[row])
    return f"provider {provider} is not a defined Provider value"


def _utc_text(time_ms: int) -> str:
    """A fix time as UTC, or its milliseconds when no calendar date holds it.

    >>> _utc_text(1_893_456_000_000), _utc_text(2**62)
    ('2030-01-01T00:00:00.000Z', '4611686018427387904 ms')
    """
    try:
        moment = datetime.fromtimestamp(time_ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return f"{time_ms} ms"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def reasons(batch: FixBatch, now_ms: int, limits: Limits) -> np.ndarray:
    """Reason code per fix (uint8); 0 where the fix is valid."""
    lat, lon = batch.lat, batch.lon
    finite = np.isfinite(lat) & np.isfinite(lon)
    oldest = EARLIEST_PLAUSIBLE_MS
    if limits.max_age_ms > 0:
        oldest = max(oldest, now_ms - limits.max_age_ms)
    with np.errstate(invalid="ignore"):
        conditions = [
            ~finite,
            np.abs(lat) > 90.0,
            np.abs(lon) > 180.0,
            (np.abs(lat) < NULL_ISLAND_DEG) & (np.abs(lon) < NULL_ISLAND_DEG),
            (batch.seq == 0) | (batch.seq > MAX_SEQ),
            batch.time_ms > now_ms + limits.max_future_skew_ms,
            batch.time_ms < oldest,
            bad_accuracy(batch.accuracy_m),
            np.logical_or.reduce(
                [
                    _bad_optional(getattr(batch, column), low, high)
                    for column, low, high, _ in ATTRIBUTE_RULES
                ]
            )
            | (batch.provider < 0)
            | (batch.provider > MAX_PROVIDER),
        ]
    choices = [
        Reason.NOT_FINITE,
        Reason.LATITUDE_OUT_OF_RANGE,
        Reason.LONGITUDE_OUT_OF_RANGE,
        Reason.NULL_ISLAND,
        Reason.INVALID_SEQ,
        Reason.FUTURE_TIME,
        Reason.ANCIENT_TIME,
        Reason.INVALID_ACCURACY,
        Reason.INVALID_ATTRIBUTE,
    ]
    return np.select(conditions, choices, default=Reason.OK).astype(np.uint8)
