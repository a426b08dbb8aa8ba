"""Keeping a processor's failure on one device's fixes from costing the others.

The event processors take a batch of many devices' stored fixes at once (a commit of
a tenant, or several). When a processor raises on a batch for anything but a store
outage (``IngestPipeline._run_processor`` waits those out), the batch is tried again
split by device: its halves, and the halves of a half that fails again, down to
single devices (a batch of one device is tried once more whole). The devices that
go through get their events, in the batch's order (each device's in the order of
its fixes); the fixes of a device that fails on its own are left out for that
processor only, logged once with the exception and counted
(``tracking_processor_failures_total``, ``tracking_processor_skipped_fixes_total``).

This relies on the processors leaving their state as it was when they raise (the
geofence detector and the route monitor change it once a batch is evaluated; the
activity processor puts back what it changed): a retry then raises every event of
the devices retried once, and none twice.

A processor that fails on every device (a bug after an upgrade) would cost two calls
per device and a log line each; once ``MAX_LEFT_OUT`` devices of a batch are left
out, the parts still failing are left out whole (one line each), without splitting
them further.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import Unavailable
from tracking_grpc.events import TrackingEvent
from tracking_grpc.observability import metrics

log = logging.getLogger(__name__)

MAX_LEFT_OUT = 8  # devices left out one by one per batch and processor
NAMED_DEVICES = 5  # devices named in the line of a part left out whole

Run = Callable[[FixBatch], Awaitable[list[TrackingEvent]]]


@dataclass(slots=True)
class _Tally:
    left_out: int = 0  # devices


async def by_device(
    processor: str, batch: FixBatch, run: Run, error: Exception
) -> list[TrackingEvent]:
    """The events ``run`` gives for the devices of ``batch`` (grouped by device)
    it does not fail on, after it failed with ``error`` on the whole batch.

    ``run`` raises ``Unavailable`` only when the server is stopping (it waits for a
    store otherwise); that ends the retries and is raised.
    """
    tally = _Tally()
    if len(batch) and device_starts(batch).size == 2:  # no halves to retry it in
        try:
            events = await run(batch)
        except Unavailable:
            raise
        except Exception as exc:
            error = exc
        else:
            log.warning(
                "processor %s failed on %d fixes of device %r of tenant %s (%r) but "
                "not when tried again; no fixes left out",
                processor,
                len(batch),
                batch.device[0],
                batch.tenant,
                error,
            )
            return events
    events = await _split(processor, batch, run, error, tally)
    if not tally.left_out:
        log.warning(
            "processor %s failed on %d fixes of tenant %s (%r) but not on their "
            "devices apart; no fixes left out",
            processor,
            len(batch),
            batch.tenant,
            error,
        )
    return events


async def _split(
    processor: str, part: FixBatch, run: Run, error: Exception, tally: _Tally
) -> list[TrackingEvent]:
    starts = device_starts(part)
    devices = starts.size - 1
    if devices == 1 or tally.left_out >= MAX_LEFT_OUT:
        _leave_out(processor, part, starts, error, tally.left_out)
        tally.left_out += devices
        return []
    middle = int(starts[devices // 2])
    events: list[TrackingEvent] = []
    for rows in (np.arange(middle), np.arange(middle, len(part))):
        await asyncio.sleep(0)  # streams are served in between
        half = part.take(rows)
        try:
            events += await run(half)
            continue
        except Unavailable:  # a stop: no more waits for the store
            raise
        except Exception as exc:
            failure = exc
        # Out of the handler: the next failure's traceback is its own.
        events += await _split(processor, half, run, failure, tally)
    return events


def device_starts(batch: FixBatch) -> np.ndarray:
    """The first row of each device of a batch grouped by device, then its size."""
    device = batch.device
    change = np.flatnonzero(device[1:] != device[:-1]) + 1
    return np.concatenate([[0], change, [len(batch)]]).astype(np.intp)


def _leave_out(
    processor: str,
    part: FixBatch,
    starts: np.ndarray,
    error: Exception,
    before: int,
) -> None:
    """Log and count the fixes of ``part`` as left out of ``processor``; ``before``
    devices of its batch were left out already."""
    devices = part.device[starts[:-1]].tolist()
    metrics.processor_failed(processor, len(devices), len(part))
    if len(devices) == 1:
        log.error(
            "processor %s failed on device %r of tenant %s: its %d fixes (seq "
            "%d-%d) are left out of its events: %r",
            processor,
            devices[0],
            part.tenant,
            len(part),
            int(part.seq.min()),
            int(part.seq.max()),
            error,
            exc_info=error,
        )
        return
    named = ", ".join(repr(d) for d in devices[:NAMED_DEVICES])
    log.error(
        "processor %s failed on %d devices of tenant %s (%s%s), not split further "
        "after %d devices of the batch were left out: their %d fixes are left out "
        "of its events: %r",
        processor,
        len(devices),
        part.tenant,
        named,
        ", ..." if len(devices) > NAMED_DEVICES else "",
        before,
        len(part),
        error,
        exc_info=error,
    )
