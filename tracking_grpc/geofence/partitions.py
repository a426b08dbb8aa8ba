"""The Redis Stream keys of events: one, or one per partition of the fleet.

With one partition the events go to the stream ``name`` (``<prefix>geofence-events``),
as they always have. With N the fleet's events are split over the N keys
``name:0`` ... ``name:N-1`` so that a Redis Cluster spreads them over its shards
(the keys carry no hash tag: each hashes to a slot of its own). A device's events all
go to one partition, so they stay in order on one stream; which one is a hash that
any consumer can compute, in any language::

    partition = crc32(tenant + "\\0" + device_id) % N    # CRC-32 of zlib, UTF-8

>>> EventStreams("trk:geofence-events", 4).key_of("default", "van-7")
'trk:geofence-events:2'
>>> EventStreams("trk:geofence-events").key_of("default", "van-7")
'trk:geofence-events'
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


def partition_of(tenant: str, device: str, partitions: int) -> int:
    """The partition, in ``[0, partitions)``, of ``device`` of ``tenant``."""
    return zlib.crc32(f"{tenant}\0{device}".encode()) % partitions


@dataclass(frozen=True, slots=True)
class EventStreams:
    """The stream keys of ``name`` split into ``partitions``."""

    name: str
    partitions: int = 1

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {self.partitions}")

    def key(self, partition: int) -> str:
        """The key of ``partition``: ``name`` itself when there is one."""
        return self.name if self.partitions == 1 else f"{self.name}:{partition}"

    def keys(self) -> list[str]:
        """Every partition's key, partition 0 first."""
        return [self.key(p) for p in range(self.partitions)]

    def key_of(self, tenant: str, device: str) -> str:
        """The key that holds the events of ``device`` of ``tenant``."""
        return self.key(partition_of(tenant, device, self.partitions))
