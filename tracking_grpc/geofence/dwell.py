"""DWELL raised by the clock, for devices that stay inside a fence and go quiet.

A fix raises DWELL when it comes at least ``dwell_ms`` after the enter (detector.py);
a parked vehicle often stops sending, so the detector's timer raises it as well.

Fix times are stamped by the device's clock, which may be minutes off the server's,
and a device that buffers sends them late. So the timer does not hold fix times
against the server clock: it measures a stay on the device's clock up to its newest
fix, and on the server's clock after that fix was received::

    inside_ms = (newest fix time - entered) + (now - newest fix's receipt)

and raises DWELL when ``inside_ms >= dwell_ms + lateness_ms``. ``lateness_ms``
(setting ``dwell_lateness_s``) is how late a fix may reach the detector (network,
retries, the processors' queue): a fix saying the device left before ``dwell_ms``,
arriving within it, is judged before the timer would raise the DWELL. A backlog
being uploaded counts as just received, so the timer waits for the rest of it.

The event's ``time_ms`` is ``entered + dwell_ms`` on the device's clock (the axis
of its fix times); its position, accuracy and ``fix_seq`` are those of the device's
newest fix, and ``attributes.last_fix_ms`` is that fix's time.

>>> overdue(
...     entered_ms=np.array([0, 0]), dwell_ms=np.array([60_000, 60_000]),
...     last_fix_ms=np.array([50_000, 10_000]),
...     received_ms=np.array([100_000, 100_000]), now_ms=140_000, lateness_ms=30_000,
... ).tolist()
[True, False]
"""

from __future__ import annotations

import logging

import numpy as np

from tracking_grpc.events import EventType, TrackingEvent, event_id

log = logging.getLogger(__name__)


def overdue(
    entered_ms: np.ndarray,
    dwell_ms: np.ndarray,
    last_fix_ms: np.ndarray,
    received_ms: np.ndarray,
    now_ms: int,
    lateness_ms: int,
) -> np.ndarray:
    """Per stay: whether its DWELL is due by the timer rule above.

    A receipt of 0 or less (unknown) counts as the fix's own time.
    """
    received = np.where(received_ms > 0, received_ms, last_fix_ms)
    silent_ms = np.maximum(now_ms - received, 0)
    inside_ms = last_fix_ms - entered_ms + silent_ms
    return (dwell_ms > 0) & (inside_ms >= dwell_ms + lateness_ms)


def timer_events(
    tenant: str,
    devices: list[str],
    fence_ids: list[str],
    entered_ms: np.ndarray,
    dwell_ms: np.ndarray,
    newest: dict[str, np.ndarray],
    created_ms: int,
) -> list[TrackingEvent]:
    """The DWELL events of due stays; ``newest`` holds, per stay, the device's
    newest fix: ``time_ms``, ``lat``, ``lon``, ``accuracy_m`` and ``seq``."""
    events = []
    for k, (device, fence_id) in enumerate(zip(devices, fence_ids, strict=True)):
        time_ms = int(entered_ms[k] + dwell_ms[k])
        attributes = {
            "inside_ms": str(int(dwell_ms[k])),
            "last_fix_ms": str(int(newest["time_ms"][k])),
        }
        accuracy = float(newest["accuracy_m"][k])
        if not np.isnan(accuracy):
            attributes["accuracy_m"] = f"{accuracy:g}"
        events.append(
            TrackingEvent(
                event_id=event_id(tenant, device, EventType.DWELL, time_ms, fence_id),
                tenant=tenant,
                device=device,
                type=EventType.DWELL,
                time_ms=time_ms,
                lat=float(newest["lat"][k]),
                lon=float(newest["lon"][k]),
                fix_seq=int(newest["seq"][k]),
                created_ms=created_ms,
                fence_id=fence_id,
                attributes=attributes,
            )
        )
    if events:
        log.debug(
            "%d DWELL events raised by the timer (tenant %s)", len(events), tenant
        )
    return events
