"""Erasure cut-offs: the fixes of an erased device that the processors must drop.

The ingest pipeline numbers its group commits in the order it takes them. An
erasure of a device marks it with the number of the last commit that holds its
fixes from before the erasure (its cut-off); the processors drop the device's fixes
of that commit and the earlier ones, whenever they reach them, and go on with its
later ones (new data: a device may keep sending). A cut-off is kept until the
processors have had every commit up to it. With no erasure pending, a processor run
pays one check of an empty dict.
"""

from __future__ import annotations

import numpy as np

from tracking_grpc.core.fixes import FixBatch


class ErasureCuts:
    """The cut-offs of the devices being erased, by tenant and device."""

    __slots__ = ("_cuts",)

    def __init__(self) -> None:
        self._cuts: dict[str, dict[str, int]] = {}

    def __bool__(self) -> bool:
        return bool(self._cuts)

    def add(self, tenant: str, device: str, commit: int) -> None:
        """Drop the device's fixes of commits up to ``commit`` (a later cut-off of
        the same device wins)."""
        devices = self._cuts.setdefault(tenant, {})
        devices[device] = max(commit, devices.get(device, 0))

    def cut(self, stored: FixBatch, commit: int) -> FixBatch:
        """``stored`` (fixes of commit ``commit``) without the fixes of devices
        erased after it; ``stored`` itself when none is."""
        devices = self._cuts.get(stored.tenant)
        if not devices:
            return stored
        erased = [device for device, cut in devices.items() if cut >= commit]
        if not erased:
            return stored
        keep = ~np.isin(stored.device, np.array(erased, dtype=object))
        return stored if keep.all() else stored.take(np.flatnonzero(keep))

    def passed(self, commit: int) -> None:
        """The processors have had every commit up to ``commit``: the cut-offs up
        to it have done their work."""
        for tenant in list(self._cuts):
            devices = self._cuts[tenant]
            for device in [d for d, cut in devices.items() if cut <= commit]:
                del devices[device]
            if not devices:
                del self._cuts[tenant]
