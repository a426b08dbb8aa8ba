"""The processors' backlog that a stop leaves behind.

Fixes are acknowledged once stored; the processors (activity, geofences, routes)
derive events and state from them afterwards, and after a burst they can be minutes
behind. A stop gives them until its deadline: from then on, what they have not begun
is left unprocessed. :class:`UnprocessedFixes` keeps what was left per tenant (how
many fixes of how many devices, their fix and receive times) and reports it once,
in the log and in ``tracking_fixes_unprocessed_total``. The fixes stay stored and
readable through the History service; their events are not raised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.observability import metrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TenantBacklog:
    """What was left of one tenant's stored fixes."""

    fixes: int = 0
    devices: set[str] = field(default_factory=set)
    first_fix_ms: int = np.iinfo(np.int64).max
    last_fix_ms: int = np.iinfo(np.int64).min
    first_received_ms: int = np.iinfo(np.int64).max
    last_received_ms: int = np.iinfo(np.int64).min

    def add(self, stored: FixBatch) -> None:
        self.fixes += len(stored)
        self.devices.update(np.unique(stored.device.astype(str)).tolist())
        self.first_fix_ms = min(self.first_fix_ms, int(stored.time_ms.min()))
        self.last_fix_ms = max(self.last_fix_ms, int(stored.time_ms.max()))
        received = stored.received_ms
        self.first_received_ms = min(self.first_received_ms, int(received.min()))
        self.last_received_ms = max(self.last_received_ms, int(received.max()))


class UnprocessedFixes:
    """Stored fixes the processors are no longer given, once the stop's deadline
    has passed (``cut_off``)."""

    def __init__(self) -> None:
        self.cut = False
        self.tenants: dict[str, TenantBacklog] = {}

    def cut_off(self) -> None:
        """From now on the processors begin nothing more."""
        self.cut = True

    def leave(self, stored: FixBatch) -> None:
        """Count ``stored`` as left unprocessed."""
        if len(stored):
            self.tenants.setdefault(stored.tenant, TenantBacklog()).add(stored)

    @property
    def fixes(self) -> int:
        return sum(backlog.fixes for backlog in self.tenants.values())

    def report(self) -> None:
        """Log what was left, one line per tenant, and count it; once."""
        for tenant, backlog in sorted(self.tenants.items()):
            log.warning(
                "tenant %s: %d stored fixes of %d devices left unprocessed at the "
                "stop deadline (fix times %s to %s, received %s to %s); their "
                "events are not raised",
                tenant,
                backlog.fixes,
                len(backlog.devices),
                _utc(backlog.first_fix_ms),
                _utc(backlog.last_fix_ms),
                _utc(backlog.first_received_ms),
                _utc(backlog.last_received_ms),
            )
        metrics.fixes_unprocessed(self.fixes)
        self.tenants = {}


def _utc(time_ms: int) -> str:
    """``2026-12-05T16:03:11.250Z``"""
    moment = datetime.fromtimestamp(time_ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
