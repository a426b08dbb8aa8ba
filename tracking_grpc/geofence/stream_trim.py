"""Erasure and retention of the Redis Stream of geofence events.

Each entry holds one event as text fields (``delivery.stream_fields``: tenant,
device_id, time_ms, ...) under an id that Redis gave it when it was appended, the
Redis clock's milliseconds. There is no index by device or by event time, so:

* erasure (``erase_device``) walks the stream of the device's partition
  (``partitions.EventStreams``) and deletes the entries of one tenant's device; the
  walk runs inside Redis, ``CHUNK`` entries per script call, so that no call holds
  Redis for long and only counts cross the network. Its cost is bounded by the
  partition's length (``delivery.STREAM_MAXLEN``).
* retention (``purge_before``), on every partition, first drops every entry
  appended before the cutoff less ``future_skew_ms`` (XTRIM MINID: an event's fix
  time is at most that far after it was raised, so all of those are older than the
  cutoff), then walks the rest for events whose fix time is before the cutoff (late
  uploads appended recently) and deletes those.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from redis.exceptions import NoScriptError

from tracking_grpc.geofence.partitions import EventStreams
from tracking_grpc.storage.redis_client import Connection, unavailable

log = logging.getLogger(__name__)

CHUNK = 1_000  # entries per script call: about a millisecond of Redis time

# KEYS[1] the stream; ARGV: first id of the walk, count, then "device" tenant device
# or "before" cutoff_ms. Deletes the matching entries among the next ``count``;
# returns {entries walked, entries deleted, id of the last entry walked}.
WALK = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
local gone = {}
local cutoff = tonumber(ARGV[4])
for _, entry in ipairs(entries) do
    local fields, values = entry[2], {}
    for i = 1, #fields, 2 do values[fields[i]] = fields[i + 1] end
    local match
    if ARGV[3] == 'device' then
        match = values['tenant'] == ARGV[4] and values['device_id'] == ARGV[5]
    else
        match = (tonumber(values['time_ms']) or cutoff) < cutoff
    end
    if match then gone[#gone + 1] = entry[1] end
end
if #gone > 0 then redis.call('XDEL', KEYS[1], unpack(gone)) end
local last = ''
if #entries > 0 then last = entries[#entries][1] end
return {#entries, #gone, last}
"""
WALK_SHA = hashlib.sha1(WALK.encode()).hexdigest()


class EventStreamTrimmer:
    """Deletes entries of the geofence event stream, split into ``partitions``: a
    device's, or old ones."""

    def __init__(
        self,
        connection: Connection,
        stream: str,
        future_skew_ms: int = 0,
        partitions: int = 1,
    ) -> None:
        self.connection = connection
        self.streams = EventStreams(stream, partitions)
        self.future_skew_ms = future_skew_ms

    async def erase_device(self, tenant: str, device: str) -> int:
        """Delete the entries of ``device`` of ``tenant`` from its partition; how
        many."""
        key = self.streams.key_of(tenant, device)
        return await self._walk(key, "-", ["device", tenant, device])

    async def purge_before(self, cutoff_ms: int) -> int:
        """Delete the entries of events whose fix time is before ``cutoff_ms``,
        from every partition."""
        minimum = max(0, cutoff_ms - self.future_skew_ms)
        purged = 0
        for key in self.streams.keys():
            with unavailable("the event stream"):
                client = await self.connection.get()
                trimmed = await client.xtrim(key, minid=minimum, approximate=False)
            purged += int(trimmed)
            purged += await self._walk(key, f"{minimum}-0", ["before", cutoff_ms])
        return purged

    async def _walk(self, key: str, start: str, match: list[Any]) -> int:
        """Walk the stream ``key`` from ``start`` to its end, deleting what
        ``match`` selects (see ``WALK``)."""
        deleted = 0
        while True:
            walked, gone, last = await self._run(key, [start, CHUNK, *match])
            deleted += int(gone)
            if int(walked) < CHUNK:
                return deleted
            start = "(" + (last.decode() if isinstance(last, bytes) else last)

    async def _run(self, key: str, args: list[Any]) -> Any:
        with unavailable("the event stream"):
            client = await self.connection.get()
            try:
                return await client.evalsha(WALK_SHA, 1, key, *args)
            except NoScriptError:  # not loaded yet on this node: EVAL loads it
                return await client.eval(WALK, 1, key, *args)

    async def close(self) -> None:
        await self.connection.close()
