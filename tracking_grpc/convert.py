"""Conversions between protobuf messages and the core's arrays.

Row messages (``Fix``) need one pass per fix; the columnar form converts with
``np.asarray`` on the packed fields. Checks of shape (lengths, indexes) raise
``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from tracking.v1 import common_pb2, track_pb2

from tracking_grpc.core import validation
from tracking_grpc.core.fixes import OPTIONAL_COLUMNS, FixBatch, FixRow
from tracking_grpc.errors import InvalidArgument

NAN = math.nan
MAX_DEVICE_ID_LENGTH = 128
EDGE_SPACE = "must not start or end with a space"


def require(message: object, name: str, field: str) -> None:
    """A message field that must be set: unset, proto3 would read it as zeros (a
    position at 0, 0), so it is refused instead."""
    if not message.HasField(name):  # type: ignore[attr-defined]
        raise InvalidArgument(field, "is required")


def check_accuracy(accuracy: float, field: str) -> None:
    """Refuse an accuracy that ingest would reject (below 0, above 1,000 km,
    infinite: ``validation.bad_accuracy``) in ingest's words; NaN, "not sent",
    is the caller's to treat."""
    if validation.bad_accuracy(np.array([accuracy], dtype=np.float64))[0]:
        raise InvalidArgument(field, validation.accuracy_refusal(accuracy))


def check_box(
    box: common_pb2.BoundingBox, field: str
) -> tuple[float, float, float, float]:
    """(south, west, north, east) of a box with bounds in range that covers some
    ground: an unset or flat box (south == north, or west == east, or west 180 and
    east -180: one meridian, crossed with no width) would match nothing, so it is
    refused like one whose south lies north of its north."""
    south, west, north, east = box.south, box.west, box.north, box.east
    for name, value, bound in (
        ("south", south, 90),
        ("north", north, 90),
        ("west", west, 180),
        ("east", east, 180),
    ):
        if not (math.isfinite(value) and -bound <= value <= bound):
            raise InvalidArgument(f"{field}.{name}", f"must be in [-{bound}, {bound}]")
    if south > north:
        raise InvalidArgument(field, "south must not lie north of north")
    if south == north or west == east:
        raise InvalidArgument(
            field, "the box is empty: south and north, and west and east, must differ"
        )
    if west == 180 and east == -180:
        raise InvalidArgument(
            field,
            "the box is empty: west 180 and east -180 are one meridian "
            "(west -180, east 180 is every longitude)",
        )
    return south, west, north, east


def device_id_fault(device_id: str) -> str | None:
    r"""Why ``device_id`` is not a device id, or None when it is one.

    The rule for every id that names a device (and for route, vehicle and job ids
    and skills): 1 to 128 printable characters (no control characters and no
    whitespace but the ASCII space), neither starting nor ending with a space, so
    that " van-7" is refused instead of becoming a device apart from "van-7".

    >>> device_id_fault("van-7"), device_id_fault("van-7 ")
    (None, 'must not start or end with a space')
    >>> device_id_fault("a\tb"), device_id_fault("\u00a0van-7")
    ('has a character that is not printable', 'has a character that is not printable')
    """
    if not device_id.strip():
        return "must not be empty or only spaces"
    if len(device_id) > MAX_DEVICE_ID_LENGTH:
        return f"longer than {MAX_DEVICE_ID_LENGTH} characters"
    if not device_id.isprintable():
        return "has a character that is not printable"
    if device_id[0] == " " or device_id[-1] == " ":
        return EDGE_SPACE
    return None


def check_erasable_device_id(device_id: str, field: str) -> str:
    """``device_id`` for ``EraseDevice``: the device id rule without its ban on a
    space at either end, which came after such ids could be stored; their data
    must stay erasable."""
    reason = device_id_fault(device_id)
    if reason is not None and reason != EDGE_SPACE:  # the last of the rule's checks
        raise InvalidArgument(field, reason)
    return device_id


def check_device_id(device_id: str, field: str) -> str:
    """``device_id`` if it follows the device id rule (:func:`device_id_fault`),
    else InvalidArgument naming ``field`` and the reason."""
    reason = device_id_fault(device_id)
    if reason is not None:
        raise InvalidArgument(field, reason)
    return device_id


def check_device_ids(device_ids: Sequence[str], field: str) -> list[str]:
    """The ids as a list if each follows the device id rule, else InvalidArgument
    naming the first that does not (``field[i]``).

    A columnar batch may list one id per fix, so each distinct id is looked at
    once and all of them together, in C: one pass over their joined text and
    numpy over their first and last characters. Only a refused list is walked id
    by id, to name the first fault.
    """
    ids = list(device_ids)
    if not _any_fault(list(dict.fromkeys(ids))):
        return ids
    for i, device_id in enumerate(ids):
        reason = device_id_fault(device_id)
        if reason is not None:
            raise InvalidArgument(f"{field}[{i}]", reason)
    return ids


def _any_fault(distinct: list[str]) -> bool:
    """Whether any of the ids breaks the device id rule (without saying which)."""
    if not distinct:
        return False
    lengths = np.fromiter(map(len, distinct), dtype=np.int64, count=len(distinct))
    if lengths.min() == 0 or lengths.max() > MAX_DEVICE_ID_LENGTH:
        return True
    joined = "".join(distinct)
    if not joined.isprintable():  # printable text holds no lone surrogate
        return True
    codes = np.frombuffer(joined.encode("utf-32-le"), dtype="<u4")
    ends = np.cumsum(lengths)
    edges = np.concatenate((codes[ends - lengths], codes[ends - 1]))
    return bool((edges == ord(" ")).any())


def fix_rows(fixes: Sequence[common_pb2.Fix]) -> list[FixRow]:
    """Row messages as plain tuples (the per-message path of a device stream)."""
    rows = []
    for f in fixes:
        has = f.HasField  # bound once: five lookups a fix otherwise
        rows.append(
            (
                f.seq,
                f.time_ms,
                f.lat,
                f.lon,
                f.accuracy_m if has("accuracy_m") else NAN,
                f.altitude_m if has("altitude_m") else NAN,
                f.speed_mps if has("speed_mps") else NAN,
                f.heading_deg if has("heading_deg") else NAN,
                f.battery_pct if has("battery_pct") else NAN,
                f.provider,
            )
        )
    return rows


def fixes_to_batch(
    tenant: str, device_id: str, fixes: Sequence[common_pb2.Fix]
) -> FixBatch:
    """Row messages of one device to a batch."""
    rows = fix_rows(fixes)
    return FixBatch.from_fix_rows(
        tenant, np.full(len(rows), device_id, dtype=object), rows
    )


def columns_to_batch(tenant: str, columns: track_pb2.ColumnarFixes) -> FixBatch:
    """A columnar batch to arrays, checking that the columns line up."""
    n = len(columns.seq)
    for name in ("device_index", "time_ms", "lat", "lon"):
        if len(getattr(columns, name)) != n:
            raise InvalidArgument(
                f"columns.{name}",
                f"has {len(getattr(columns, name))} values, seq has {n}",
            )
    for name in (*OPTIONAL_COLUMNS, "provider"):
        size = len(getattr(columns, name))
        if size not in (0, n):
            raise InvalidArgument(
                f"columns.{name}", f"has {size} values; expected 0 or {n}"
            )
    device_ids = check_device_ids(columns.device_ids, "columns.device_ids")
    index = np.asarray(columns.device_index, dtype=np.intp)
    if n and (index.max() >= len(device_ids)):
        raise InvalidArgument(
            "columns.device_index",
            f"refers to device {int(index.max())} of {len(device_ids)}",
        )
    devices = np.asarray(device_ids, dtype=object)
    return FixBatch.from_columns(
        tenant,
        devices[index] if n else np.empty(0, dtype=object),
        np.asarray(columns.seq, dtype=np.uint64),
        np.asarray(columns.time_ms, dtype=np.int64),
        np.asarray(columns.lat, dtype=np.float64),
        np.asarray(columns.lon, dtype=np.float64),
        provider=np.asarray(columns.provider, dtype=np.int32),
        **{
            name: np.asarray(getattr(columns, name), dtype=np.float32)
            for name in OPTIONAL_COLUMNS
        },
    )


def positions(batch: FixBatch) -> list[common_pb2.Position]:
    """One Position message per row; NaN columns are left unset."""
    out = []
    optional = {name: getattr(batch, name).tolist() for name in OPTIONAL_COLUMNS}
    for i, (device, seq, t, lat, lon, provider, received) in enumerate(
        zip(
            batch.device.tolist(),
            batch.seq.tolist(),
            batch.time_ms.tolist(),
            batch.lat.tolist(),
            batch.lon.tolist(),
            batch.provider.tolist(),
            batch.received_ms.tolist(),
            strict=True,
        )
    ):
        extra = {k: v[i] for k, v in optional.items() if v[i] == v[i]}
        out.append(
            common_pb2.Position(
                device_id=device,
                seq=seq,
                time_ms=t,
                lat=lat,
                lon=lon,
                provider=provider,
                received_ms=received,
                **extra,
            )
        )
    return out


def rejections(batch: FixBatch, reasons: np.ndarray) -> list[tuple[str, int, int, str]]:
    """(device, seq, reason, detail) for the first ``LISTED_REJECTIONS`` rejected
    fixes."""
    rows = np.flatnonzero(reasons)[: validation.LISTED_REJECTIONS]
    return [
        (
            batch.device[i],
            int(batch.seq[i]),
            int(reasons[i]),
            validation.detail(batch, i, int(reasons[i])),
        )
        for i in rows.tolist()
    ]
