"""Fixes as parallel arrays.

A :class:`FixBatch` holds one row per fix in numpy columns so that validation,
de-duplication, storage and geofencing work on whole batches at once.

>>> batch = FixBatch.from_rows("t1", [("dev-a", 1, 1_700_000_000_000, 51.5, -0.12)])
>>> len(batch), batch.lat[0]
(1, 51.5)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

# The Provider enum travels as an int32; codes beyond it only come from tools.
PROVIDER_MIN, PROVIDER_MAX = -(2**31), 2**31 - 1

OPTIONAL_COLUMNS = (
    "accuracy_m",
    "altitude_m",
    "speed_mps",
    "heading_deg",
    "battery_pct",
)

# One fix as read off a row message: seq, time_ms, lat, lon, accuracy_m, altitude_m,
# speed_mps, heading_deg, battery_pct (NaN when unset), provider. A device stream's
# fixes stay plain tuples until a group commit turns many streams' rows into columns.
FixRow = tuple[int, int, float, float, float, float, float, float, float, int]


@dataclass(frozen=True, slots=True)
class FixBatch:
    """Fixes of one tenant, one row per fix; NaN marks a missing optional value."""

    tenant: str
    device: np.ndarray  # object array of device id strings
    seq: np.ndarray  # uint64
    time_ms: np.ndarray  # int64, fix time
    lat: np.ndarray  # float64
    lon: np.ndarray  # float64
    accuracy_m: np.ndarray  # float32
    altitude_m: np.ndarray  # float32
    speed_mps: np.ndarray  # float32
    heading_deg: np.ndarray  # float32
    battery_pct: np.ndarray  # float32
    provider: np.ndarray  # int32, the wire type of the Provider enum
    received_ms: np.ndarray  # int64, server receive time

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    @classmethod
    def from_columns(
        cls,
        tenant: str,
        device: Sequence[str] | np.ndarray,
        seq: Sequence[int] | np.ndarray,
        time_ms: Sequence[int] | np.ndarray,
        lat: Sequence[float] | np.ndarray,
        lon: Sequence[float] | np.ndarray,
        *,
        received_ms: int | np.ndarray | None = None,
        provider: Sequence[int] | np.ndarray | None = None,
        **optional: Sequence[float] | np.ndarray | None,
    ) -> FixBatch:
        """Build a batch from columns; missing optional columns become NaN."""
        seq_arr = np.asarray(seq, dtype=np.uint64)
        n = seq_arr.shape[0]
        unknown = set(optional) - set(OPTIONAL_COLUMNS)
        if unknown:
            raise TypeError(f"unknown columns: {sorted(unknown)}")
        columns = {}
        for name in OPTIONAL_COLUMNS:
            values = optional.get(name)
            if values is None or len(values) == 0:
                columns[name] = np.full(n, np.nan, dtype=np.float32)
            else:
                columns[name] = np.asarray(values, dtype=np.float32)
        if received_ms is None:
            received_ms = np.zeros(n, dtype=np.int64)
        return cls(
            tenant=tenant,
            device=np.asarray(device, dtype=object),
            seq=seq_arr,
            time_ms=np.asarray(time_ms, dtype=np.int64),
            lat=np.asarray(lat, dtype=np.float64),
            lon=np.asarray(lon, dtype=np.float64),
            provider=_provider_column(provider, n),
            received_ms=np.broadcast_to(
                np.asarray(received_ms, dtype=np.int64), (n,)
            ).copy(),
            **columns,
        )

    @classmethod
    def from_rows(
        cls, tenant: str, rows: Iterable[tuple[str, int, int, float, float]]
    ) -> FixBatch:
        """Build a batch from (device, seq, time_ms, lat, lon) rows (tests, tools)."""
        rows = list(rows)
        if not rows:
            return cls.empty(tenant)
        device, seq, time_ms, lat, lon = zip(*rows, strict=True)
        return cls.from_columns(tenant, device, seq, time_ms, lat, lon)

    @classmethod
    def from_fix_rows(
        cls, tenant: str, device: np.ndarray, rows: Sequence[FixRow]
    ) -> FixBatch:
        """Build a batch from ``FixRow`` tuples and the device id of each row."""
        if not rows:
            return cls.empty(tenant)
        (
            seq,
            time_ms,
            lat,
            lon,
            accuracy,
            altitude,
            speed,
            heading,
            battery,
            provider,
        ) = zip(*rows, strict=True)
        return cls.from_columns(
            tenant,
            device,
            seq,
            time_ms,
            lat,
            lon,
            provider=provider,
            accuracy_m=accuracy,
            altitude_m=altitude,
            speed_mps=speed,
            heading_deg=heading,
            battery_pct=battery,
        )

    @classmethod
    def empty(cls, tenant: str) -> FixBatch:
        return cls.from_columns(tenant, [], [], [], [], [])

    @classmethod
    def concat(cls, batches: Sequence[FixBatch]) -> FixBatch:
        """Join batches of one tenant."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        tenant = batches[0].tenant
        if any(b.tenant != tenant for b in batches):
            raise ValueError("concat joins batches of one tenant only")
        if len(batches) == 1:
            return batches[0]
        arrays = {
            name: np.concatenate([getattr(b, name) for b in batches])
            for name in ARRAY_FIELDS
        }
        return cls(tenant=tenant, **arrays)

    def take(self, index: np.ndarray) -> FixBatch:
        """Rows selected by an integer index or a boolean mask, in that order."""
        arrays = {name: getattr(self, name)[index] for name in ARRAY_FIELDS}
        return FixBatch(tenant=self.tenant, **arrays)

    def sorted_by_device_time(self) -> FixBatch:
        """Rows ordered by device, then fix time, then sequence number."""
        order = np.lexsort((self.seq, self.time_ms, self.device.astype(str)))
        return self.take(order)

    def with_received(self, received_ms: int) -> FixBatch:
        return replace(self, received_ms=np.full(len(self), received_ms, np.int64))

    def newest_per_device(self) -> np.ndarray:
        """Index of the newest fix (by fix time, then seq) of each device."""
        if len(self) == 0:
            return np.empty(0, dtype=np.intp)
        devices = self.device.astype(str)
        order = np.lexsort((self.seq, self.time_ms, devices))
        ordered = devices[order]
        last = np.ones(len(order), dtype=bool)
        last[:-1] = ordered[1:] != ordered[:-1]
        return order[last]


def _provider_column(provider: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    """Provider codes as sent: an undefined code keeps its value, so validation
    rejects it and names it (a narrower column would wrap 257 round to 1)."""
    if provider is None or len(provider) == 0:
        return np.zeros(n, dtype=np.int32)
    wide = np.asarray(provider, dtype=np.int64)
    return np.clip(wide, PROVIDER_MIN, PROVIDER_MAX).astype(np.int32)


# The array columns, in field order; computed once (``fields()`` is slow per call and
# take/concat run several times per group commit).
ARRAY_FIELDS = tuple(f.name for f in fields(FixBatch) if f.name != "tenant")
