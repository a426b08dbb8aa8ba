"""What a server process's watchers want: the union of their filters, per tenant.

Publishers route each live update only to the processes whose interest matches it
(:mod:`tracking_grpc.storage.redis_broker`). A summary may want more than its
watchers do, never less: each watcher filters exactly when an update arrives. So a
watcher of some devices within an area counts as wanting those devices anywhere,
and a process with more than ``MAX_AREAS`` areas for a tenant wants all of it.

>>> from tracking_grpc.fanout import WatchFilter
>>> summarise([WatchFilter(frozenset({"a"})), WatchFilter(box=(0, 0, 1, 1))]).devices
frozenset({'a'})
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.core.geodesy import in_box, in_circle
from tracking_grpc.core.precision import slack_m, widen_box

if TYPE_CHECKING:
    from tracking_grpc.fanout import WatchFilter

MAX_AREAS = 64

Box = tuple[float, float, float, float]  # south, west, north, east
Circle = tuple[float, float, float]  # lat, lon, radius_m


@dataclass(frozen=True)
class TenantInterest:
    """The positions of one tenant that a process's watchers may want."""

    everything: bool = False
    devices: frozenset[str] = frozenset()
    boxes: tuple[Box, ...] = ()
    circles: tuple[Circle, ...] = ()

    @cached_property
    def device_array(self) -> np.ndarray:
        return np.array(sorted(self.devices), dtype=str)

    def mask(self, batch: FixBatch, names: np.ndarray | None = None) -> np.ndarray:
        """Rows of ``batch`` (of this tenant) that the process may want; ``names``:
        the batch's device ids as a str array, if the caller has it already."""
        if self.everything:
            return np.ones(len(batch), dtype=bool)
        keep = np.zeros(len(batch), dtype=bool)
        if self.devices:
            if names is None:
                names = batch.device.astype(str)
            known = self.device_array
            at = np.minimum(np.searchsorted(known, names), len(known) - 1)
            keep |= known[at] == names
        for box in self.boxes:
            keep |= in_box(batch.lat, batch.lon, *box)
        for circle in self.circles:
            keep |= in_circle(batch.lat, batch.lon, *circle)
        return keep

    def to_json(self) -> dict[str, Any]:
        if self.everything:
            return {"all": True}
        return {
            "devices": sorted(self.devices),
            "boxes": [list(b) for b in self.boxes],
            "circles": [list(c) for c in self.circles],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TenantInterest:
        if data.get("all"):
            return cls(everything=True)
        return cls(
            devices=frozenset(data.get("devices", ())),
            boxes=tuple(_box(b) for b in data.get("boxes", ())),
            circles=tuple(_circle(c) for c in data.get("circles", ())),
        )


Interest = Mapping[str, TenantInterest]


def summarise(filters: Iterable[WatchFilter]) -> TenantInterest:
    """The union of watch filters of one tenant, widened where that is simpler."""
    devices: set[str] = set()
    boxes: dict[Box, None] = {}
    circles: dict[Circle, None] = {}
    for f in filters:
        if f.devices:
            devices |= f.devices  # within an area or not: the devices suffice
        elif f.box is not None:
            # A coarse watcher's area holds cell centres: fixes up to a cell's
            # reach outside it may be wanted.
            box = widen_box(f.box, slack_m(f.precision_m)) if f.precision_m else f.box
            boxes[tuple(map(float, box))] = None  # type: ignore[index]
        elif f.circle is not None:
            lat, lon, radius_m = f.circle
            radius_m += slack_m(f.precision_m)
            circles[(float(lat), float(lon), float(radius_m))] = None
        else:
            return TenantInterest(everything=True)
    if len(boxes) + len(circles) > MAX_AREAS:
        return TenantInterest(everything=True)
    return TenantInterest(
        devices=frozenset(devices), boxes=tuple(boxes), circles=tuple(circles)
    )


def _box(values: Iterable[float]) -> Box:
    south, west, north, east = map(float, values)
    return south, west, north, east


def _circle(values: Iterable[float]) -> Circle:
    lat, lon, radius_m = map(float, values)
    return lat, lon, radius_m
