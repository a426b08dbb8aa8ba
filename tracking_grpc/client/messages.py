"""Between client-side columns and protobuf messages, and readable output lines."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
from tracking.v1 import common_pb2

from tracking_grpc.traces import TRACE_COLUMNS, Trace

OPTIONAL_FIELDS = (
    "accuracy_m",
    "altitude_m",
    "speed_mps",
    "heading_deg",
    "battery_pct",
)


def trace_fixes(
    trace: Trace, time_ms: np.ndarray | None = None
) -> list[common_pb2.Fix]:
    """One ``Fix`` per trace row; ``time_ms`` replaces the recorded times if given."""
    times = trace.time_ms if time_ms is None else time_ms
    optional = {name: getattr(trace, name) for name in TRACE_COLUMNS}
    present = {name: ~np.isnan(values) for name, values in optional.items()}
    fixes = []
    for i in range(len(trace)):
        fix = common_pb2.Fix(
            seq=int(trace.seq[i]),
            time_ms=int(times[i]),
            lat=float(trace.lat[i]),
            lon=float(trace.lon[i]),
        )
        for name, values in optional.items():
            if present[name][i]:
                setattr(fix, name, float(values[i]))
        fixes.append(fix)
    return fixes


def iso_time(time_ms: int) -> str:
    """``2026-01-26T15:57:02.000Z``."""
    stamp = dt.datetime.fromtimestamp(time_ms / 1000, tz=dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{time_ms % 1000:03d}Z"


def position_dict(position: common_pb2.Position) -> dict:
    """A position as plain JSON values; absent optional fields are left out."""
    out = {
        "device_id": position.device_id,
        "seq": position.seq,
        "time": iso_time(position.time_ms),
        "time_ms": position.time_ms,
        "lat": position.lat,
        "lon": position.lon,
    }
    for name in OPTIONAL_FIELDS:
        if position.HasField(name):
            out[name] = round(getattr(position, name), 3)
    if position.provider:
        out["provider"] = common_pb2.Provider.Name(position.provider)
    if position.received_ms:
        out["received_ms"] = position.received_ms
    return out


def position_json(position: common_pb2.Position, **extra: object) -> str:
    return json.dumps(position_dict(position) | extra, separators=(",", ":"))


def position_line(position: common_pb2.Position, note: str = "") -> str:
    """One readable line: time, device, position and what else the fix carries."""
    parts = [
        iso_time(position.time_ms),
        f"{position.device_id:<12}",
        f"{position.lat:10.6f},{position.lon:11.6f}",
        f"#{position.seq}",
    ]
    if position.HasField("speed_mps") and math.isfinite(position.speed_mps):
        parts.append(f"{position.speed_mps * 3.6:5.1f} km/h")
    if position.HasField("heading_deg") and math.isfinite(position.heading_deg):
        parts.append(f"{position.heading_deg:5.1f}°")
    if position.HasField("accuracy_m"):
        parts.append(f"±{position.accuracy_m:.0f} m")
    if note:
        parts.append(note)
    return "  ".join(parts)
