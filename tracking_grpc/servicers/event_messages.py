"""Events as messages, coarsened for a caller limited to a precision.

A coarse caller's events carry the cell centre of their fix
(:func:`tracking_grpc.core.precision.snap`), an ``accuracy_m`` attribute widened
as a position's would be, distances (route progress and deviation, activity
distances and odometer) rounded to whole multiples of the precision, ETAs rounded
(:func:`tracking_grpc.core.precision.round_eta_ms`), and no speeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace

import numpy as np
from tracking.v1 import event_pb2

from tracking_grpc.core.precision import round_eta_ms, round_m, snap
from tracking_grpc.events import ActivityDetail, TrackingEvent

# Attributes holding distances in metres (route events).
DISTANCE_ATTRIBUTES = ("deviation_m", "progress_m", "remaining_m")


def event_message(event: TrackingEvent) -> event_pb2.Event:
    return event_pb2.Event(
        event_id=event.event_id,
        device_id=event.device,
        type=int(event.type),
        time_ms=event.time_ms,
        position={"lat": event.lat, "lon": event.lon},
        fix_seq=event.fix_seq,
        created_ms=event.created_ms,
        attributes=event.attributes,
        fence_id=event.fence_id,
        route_id=event.route_id,
        activity=(
            event_pb2.ActivityDetail(**asdict(event.activity))
            if event.activity is not None
            else None
        ),
    )


def event_messages(
    events: Sequence[TrackingEvent], precision_m: float = 0.0
) -> list[event_pb2.Event]:
    """The events as messages, as a caller limited to ``precision_m`` may see them
    (0: exact)."""
    if precision_m <= 0 or not events:
        return [event_message(e) for e in events]
    lat, lon, bound_m = snap(
        np.fromiter((e.lat for e in events), np.float64, len(events)),
        np.fromiter((e.lon for e in events), np.float64, len(events)),
        precision_m,
    )
    cells = zip(lat.tolist(), lon.tolist(), bound_m.tolist(), strict=True)
    return [
        event_message(_coarse(event, precision_m, *cell))
        for event, cell in zip(events, cells, strict=True)
    ]


def _coarse(
    event: TrackingEvent, precision_m: float, lat: float, lon: float, bound_m: float
) -> TrackingEvent:
    attributes = dict(event.attributes)
    accuracy = attributes.get("accuracy_m")
    attributes["accuracy_m"] = f"{bound_m + (float(accuracy) if accuracy else 0):.0f}"
    for name in DISTANCE_ATTRIBUTES:
        if name in attributes:
            rounded = round_m(float(attributes[name]), precision_m)
            attributes[name] = f"{float(rounded):.0f}"
    if "eta_ms" in attributes:
        eta_ms = round_eta_ms(int(attributes["eta_ms"]), event.time_ms, precision_m)
        attributes["eta_ms"] = str(eta_ms)
    for name in [n for n in attributes if n.endswith("_mps")]:
        del attributes[name]  # speeds, withheld as a position's are
    return replace(
        event,
        lat=lat,
        lon=lon,
        attributes=attributes,
        activity=_coarse_activity(event.activity, precision_m),
    )


def _coarse_activity(
    detail: ActivityDetail | None, precision_m: float
) -> ActivityDetail | None:
    if detail is None:
        return None
    # Speeds are withheld (0: unset), as a coarse fix's are: with a trip's duration
    # they would give back its exact distance.
    return replace(
        detail,
        distance_m=float(round_m(detail.distance_m, precision_m)),
        odometer_m=float(round_m(detail.odometer_m, precision_m)),
        speed_mps=0.0,
        avg_speed_mps=0.0,
        max_speed_mps=0.0,
    )
