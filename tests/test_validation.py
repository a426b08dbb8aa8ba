"""Validation of fixes on arrays, and the ordering rules of the fix batch."""

from __future__ import annotations

import numpy as np
import pytest

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.core.validation import Limits, Reason, reasons

NOW = 1_750_000_000_000
LIMITS = Limits(max_future_skew_ms=600_000, max_age_ms=86_400_000)


def one(lat=45.0, lon=7.0, time_ms=NOW, seq=1, **optional) -> FixBatch:
    return FixBatch.from_columns(
        "t",
        ["d"],
        [seq],
        [time_ms],
        [lat],
        [lon],
        **{k: [v] for k, v in optional.items()},
    )


@pytest.mark.parametrize(
    ("batch", "reason"),
    [
        pytest.param(one(), Reason.OK, id="valid"),
        pytest.param(one(lat=-90.0, lon=180.0), Reason.OK, id="valid-extremes"),
        pytest.param(one(lat=90.0000001), Reason.LATITUDE_OUT_OF_RANGE, id="lat"),
        pytest.param(one(lon=-180.01), Reason.LONGITUDE_OUT_OF_RANGE, id="lon"),
        pytest.param(one(lat=np.nan), Reason.NOT_FINITE, id="nan-lat"),
        pytest.param(one(lon=-np.inf), Reason.NOT_FINITE, id="inf-lon"),
        pytest.param(one(lat=0.0, lon=0.0), Reason.NULL_ISLAND, id="null-island"),
        pytest.param(one(lat=0.0, lon=0.001), Reason.OK, id="near-null-island"),
        pytest.param(one(seq=0), Reason.INVALID_SEQ, id="seq-zero"),
        pytest.param(one(seq=2**63), Reason.INVALID_SEQ, id="seq-too-big"),
        pytest.param(one(time_ms=NOW + 600_001), Reason.FUTURE_TIME, id="future"),
        pytest.param(one(time_ms=NOW + 600_000), Reason.OK, id="future-edge"),
        pytest.param(one(time_ms=NOW - 86_400_001), Reason.ANCIENT_TIME, id="old"),
        pytest.param(one(time_ms=0), Reason.ANCIENT_TIME, id="epoch-0"),
        pytest.param(one(accuracy_m=-1.0), Reason.INVALID_ACCURACY, id="accuracy<0"),
        pytest.param(
            one(accuracy_m=np.inf), Reason.INVALID_ACCURACY, id="accuracy-inf"
        ),
        pytest.param(one(accuracy_m=1e30), Reason.INVALID_ACCURACY, id="accuracy-1e30"),
        pytest.param(
            one(accuracy_m=1_000_001.0), Reason.INVALID_ACCURACY, id="accuracy>1000km"
        ),
        pytest.param(one(accuracy_m=1_000_000.0), Reason.OK, id="accuracy-1000km"),
        pytest.param(one(accuracy_m=np.nan), Reason.OK, id="accuracy-not-sent"),
        pytest.param(one(speed_mps=-2.0), Reason.INVALID_ATTRIBUTE, id="speed<0"),
        pytest.param(one(heading_deg=400.0), Reason.INVALID_ATTRIBUTE, id="heading"),
        pytest.param(one(battery_pct=101.0), Reason.INVALID_ATTRIBUTE, id="battery"),
    ],
)
def test_reason_per_fault(batch: FixBatch, reason: Reason) -> None:
    assert reasons(batch, NOW, LIMITS).tolist() == [reason]


def test_max_age_zero_accepts_any_time_since_2000() -> None:
    old = one(time_ms=1_000_000_000_000)  # 2001
    assert reasons(old, NOW, Limits(max_age_ms=0)).tolist() == [Reason.OK]


def test_newest_per_device_uses_fix_time_not_arrival() -> None:
    batch = FixBatch.from_rows(
        "t", [("a", 1, 100, 1, 1), ("a", 3, 50, 1, 1), ("b", 1, 10, 1, 1)]
    )
    newest = batch.take(batch.newest_per_device())
    assert sorted(zip(newest.device.tolist(), newest.seq.tolist(), strict=True)) == [
        ("a", 1),
        ("b", 1),
    ]


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(one(altitude_m=-1e6), id="altitude-below-trench"),
        pytest.param(one(altitude_m=np.inf), id="altitude-inf"),
        pytest.param(
            FixBatch.from_columns("t", ["d"], [1], [NOW], [1.0], [1.0], provider=[99]),
            id="provider-undefined",
        ),
        pytest.param(
            FixBatch.from_columns("t", ["d"], [1], [NOW], [1.0], [1.0], provider=[300]),
            id="provider-beyond-int8",
        ),
    ],
)
def test_implausible_attributes_are_rejected(batch: FixBatch) -> None:
    assert reasons(batch, NOW, LIMITS).tolist() == [Reason.INVALID_ATTRIBUTE]
