"""The production live store: newest positions and a GEO index in Redis.

An update is two pipelined rounds, whatever the batch size. First, a Lua script
compares each device's fix time with the one stored in its device bucket and keeps
only newer fixes, atomically, so that concurrent writers in several processes can
never move a live position backwards. Second, a Lua script moves the accepted
devices in their coarse cells' GEO sets, again only if newer than what the cell saw
of the device, so the GEO index converges to the live hashes whatever order the
scripts of different processes run in. A small update on a single Redis (a stream
commit's) makes the first round also place the devices in their new cells; the
second then only takes a device out of a cell it left, and is skipped when no
device changed cell. Key layout: :mod:`redis_keys`.

A script gets its devices as a few long arguments (lists joined by newlines, the
records packed back to back) and answers in packed int32s, and inside it reads and
writes with bulk commands: per fix, the client packs and parses no argument of its
own, and Redis runs a handful of commands per bucket or cell, not per device. On a
single Redis each round of a small update (a stream commit's) is one script call for
all its buckets (or cells); a larger update, and any on a Redis Cluster (where a
script's keys must share a slot), makes one call per bucket (or cell).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from itertools import chain
from typing import Any

import numpy as np
from redis.exceptions import NoScriptError

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import Unavailable
from tracking_grpc.storage import redis_keys as keys
from tracking_grpc.storage.redis_client import Connection, is_cluster, unavailable

log = logging.getLogger(__name__)

RECORD = np.dtype(
    [
        ("seq", "<u8"),
        ("time_ms", "<i8"),
        ("lat", "<f8"),
        ("lon", "<f8"),
        ("accuracy_m", "<f4"),
        ("altitude_m", "<f4"),
        ("speed_mps", "<f4"),
        ("heading_deg", "<f4"),
        ("battery_pct", "<f4"),
        ("provider", "<i1"),
        ("received_ms", "<i8"),
    ]
)
RECORD_NAMES: tuple[str, ...] = RECORD.names or ()  # a structured dtype has names

# Helpers of the scripts below. A list arrives as one argument, "\n"-separated
# (device ids are printable, so never hold one); Lua's unpack is limited to a few
# thousand values, so bulk commands go in chunks.
LUA_HELPERS = """
local function split(text)
    local out, start = {}, 1
    while true do
        local stop = string.find(text, '\\n', start, true)
        if not stop then
            out[#out + 1] = string.sub(text, start)
            return out
        end
        out[#out + 1] = string.sub(text, start, stop - 1)
        start = stop + 1
    end
end
local function bulk(command, key, items, step)
    for i = 1, #items, step do
        redis.call(command, key, unpack(items, i, math.min(i + step - 1, #items)))
    end
end
local function hmget(key, fields)
    local out = {}
    for i = 1, #fields, 1000 do
        local part = redis.call(
            'HMGET', key, unpack(fields, i, math.min(i + 999, #fields)))
        for j = 1, #part do
            out[#out + 1] = part[j]
        end
    end
    return out
end
"""

# Updates of up to this many rows (the few fixes of a stream commit) go in one
# script call per round on a single Redis; larger ones (gateway batches) in one call
# per group, as on a cluster: with one call per round for 5,000-fix batches at
# 30,000 fixes/s, load runs fell seconds behind (bench/README.md, third pass).
SINGLE_CALL_ROWS = 1_000

# Key names kept for reuse: 64 bucket pairs per tenant and the pairs of the cells
# its devices are in.
KEY_PAIRS_KEPT = 50_000

# A rebuild mends the GEO index this many cells at a time (their members read in one
# pipeline).
MEND_CELLS = 256

# A script call serves one or more groups of devices (a bucket's, or a cell's), each
# with its own pair of keys: on a Redis Cluster one group per call (a script's keys
# share one slot), on a single Redis every group of a small update in one call. The
# last argument is each group's device count; the lists run group after group.
LUA_GROUPS = """
local function group_sizes(text, devices)
    local sizes, total = {}, 0
    for count in string.gmatch(text, '%d+') do
        sizes[#sizes + 1] = tonumber(count)
        total = total + tonumber(count)
    end
    if total ~= devices or #sizes * 2 ~= #KEYS then
        return nil
    end
    return sizes
end
local function slice(items, first, last)
    local out = {}
    for i = first, last do
        out[#out + 1] = items[i]
    end
    return out
end
"""

# Keeps the fixes of devices first..last, one bucket group (live hash KEYS[2g-1],
# time hash KEYS[2g]), that are newer than the stored ones: writes their records
# (ARGV[3], size bytes each) and times, appends (position, previous cell or -1) of
# each to out as packed int32s, and calls kept(i, time) for each if given.
LUA_KEEP_NEWER = """
local function keep_newer(g, first, last, devices, stamps, size, out, kept)
    local names = {}
    for i = first, last do
        names[#names + 1] = devices[i]
    end
    local known = hmget(KEYS[2 * g], names)
    local records, times = {}, {}
    for i = first, last do
        local seen, stamp = known[i - first + 1], stamps[i]
        local time = string.sub(stamp, 1, string.find(stamp, ' ', 1, true) - 1)
        local previous_cell = -1
        local newer = true
        if seen then
            local gap = string.find(seen, ' ', 1, true)
            newer = tonumber(time) {op} tonumber(string.sub(seen, 1, gap - 1))
            previous_cell = tonumber(string.sub(seen, gap + 1))
        end
        if newer then
            times[#times + 1] = devices[i]
            times[#times + 1] = stamp
            records[#records + 1] = devices[i]
            records[#records + 1] = string.sub(ARGV[3], (i - 1) * size + 1, i * size)
            out[#out + 1] = struct.pack('<i4i4', i - 1, previous_cell)
            if kept then
                kept(i, time)
            end
        end
    end
    bulk('HSET', KEYS[2 * g], times, 1000)
    bulk('HSET', KEYS[2 * g - 1], records, 1000)
end
"""

# KEYS: live hash, time hash of each group (a bucket). ARGV: devices,
# "<time_ms> <cell>" per device (lists), the packed records (ARGV[4] bytes each, in
# device order), record size, group sizes. Returns, packed as little-endian int32
# pairs, (position in the device list, previous cell or -1) for each accepted fix.
KEEP_NEWER_TEMPLATE = (
    LUA_HELPERS
    + LUA_GROUPS
    + LUA_KEEP_NEWER
    + """
local devices, stamps = split(ARGV[1]), split(ARGV[2])
local size = tonumber(ARGV[4])
local sizes = group_sizes(ARGV[5], #devices)
if #devices ~= #stamps or #devices * size ~= #ARGV[3] or not sizes then
    return redis.error_reply('live update: device, time and record lists differ')
end
local out, first = {}, 1
for g = 1, #sizes do
    local last = first + sizes[g] - 1
    keep_newer(g, first, last, devices, stamps, size, out, nil)
    first = last + 1
end
return table.concat(out)
"""
)

# KEYS: GEO set, time hash of each group (a cell). ARGV: devices, time_ms, lon, lat
# (lists), one character per device (1 to place it in its group's cell, 0 to take
# it out), group sizes.
MOVE_IN_CELL_TEMPLATE = (
    LUA_HELPERS
    + LUA_GROUPS
    + """
local devices, times = split(ARGV[1]), split(ARGV[2])
local lons, lats, enter = split(ARGV[3]), split(ARGV[4]), ARGV[5]
local sizes = group_sizes(ARGV[6], #devices)
if #times ~= #devices or #lons ~= #devices or #lats ~= #devices
        or #enter ~= #devices or not sizes then
    return redis.error_reply('live move: the lists differ in length')
end
local first = 1
for g = 1, #sizes do
    local last = first + sizes[g] - 1
    local known = hmget(KEYS[2 * g], slice(devices, first, last))
    local stamps, places, leaving = {}, {}, {}
    for i = first, last do
        local seen = known[i - first + 1]
        if (not seen) or tonumber(times[i]) {op} tonumber(seen) then
            stamps[#stamps + 1] = devices[i]
            stamps[#stamps + 1] = times[i]
            if string.byte(enter, i) == 49 then
                places[#places + 1] = lons[i]
                places[#places + 1] = lats[i]
                places[#places + 1] = devices[i]
            else
                leaving[#leaving + 1] = devices[i]
            end
        end
    end
    bulk('HSET', KEYS[2 * g], stamps, 1000)
    bulk('GEOADD', KEYS[2 * g - 1], places, 999)
    bulk('ZREM', KEYS[2 * g - 1], leaving, 1000)
    first = last + 1
end
return 0
"""
)

# One call for a whole small update on a single Redis: keeps the newer fixes as
# KEEP_NEWER does, places their devices in the GEO sets of the cells they are in
# now as MOVE_IN_CELL does, and records those cells as used. Taking a device out
# of the cell it left needs that cell's keys, known only from the reply: the
# caller makes that move (rare: a device crosses into another cell) with
# MOVE_IN_CELL. KEYS: live hash and time hash of each bucket group, then GEO set
# and time hash of each cell, then the tenant's set of used cells. ARGV: devices,
# "<time_ms> <cell>" per device, packed records, record size, bucket group sizes
# (as KEEP_NEWER's), then per device the number of its cell among the keys (from
# 1), lon and lat (lists), and the cells' ids. Returns what KEEP_NEWER returns.
KEEP_AND_PLACE_TEMPLATE = (
    LUA_HELPERS
    + LUA_KEEP_NEWER
    + """
local devices, stamps = split(ARGV[1]), split(ARGV[2])
local size = tonumber(ARGV[4])
local sizes, total = {}, 0
for count in string.gmatch(ARGV[5], '%d+') do
    sizes[#sizes + 1] = tonumber(count)
    total = total + tonumber(count)
end
local slots, lons, lats = split(ARGV[6]), split(ARGV[7]), split(ARGV[8])
local cell_ids = split(ARGV[9])
local first_cell_key = 2 * #sizes
if total ~= #devices or #stamps ~= #devices or #slots ~= #devices
        or #lons ~= #devices or #lats ~= #devices
        or #devices * size ~= #ARGV[3]
        or #KEYS ~= first_cell_key + 2 * #cell_ids + 1 then
    return redis.error_reply('live update: the lists differ in length')
end
local out, placing, first = {}, {}, 1
local function place(i, time)
    local slot = tonumber(slots[i])
    placing[slot] = placing[slot] or {}
    table.insert(placing[slot], {i, time})
end
for g = 1, #sizes do
    local last = first + sizes[g] - 1
    keep_newer(g, first, last, devices, stamps, size, out, place)
    first = last + 1
end
for slot, entries in pairs(placing) do
    local geo = KEYS[first_cell_key + 2 * slot - 1]
    local seen_key = KEYS[first_cell_key + 2 * slot]
    local names = {}
    for _, entry in ipairs(entries) do
        names[#names + 1] = devices[entry[1]]
    end
    local known = hmget(seen_key, names)
    local stamped, places = {}, {}
    for k, entry in ipairs(entries) do
        local i, time = entry[1], entry[2]
        if (not known[k]) or tonumber(time) {op} tonumber(known[k]) then
            stamped[#stamped + 1] = devices[i]
            stamped[#stamped + 1] = time
            places[#places + 1] = lons[i]
            places[#places + 1] = lats[i]
            places[#places + 1] = devices[i]
        end
    end
    bulk('HSET', seen_key, stamped, 1000)
    bulk('GEOADD', geo, places, 999)
end
bulk('SADD', KEYS[#KEYS], cell_ids, 1000)
return table.concat(out)
"""
)

# Updates take strictly newer fixes; a repair (after a partial failure) also
# re-applies a fix equal to the stored one, which rewrites a missed GEO move.
KEEP_NEWER = KEEP_NEWER_TEMPLATE.replace("{op}", ">")
KEEP_SAME_OR_NEWER = KEEP_NEWER_TEMPLATE.replace("{op}", ">=")
MOVE_IN_CELL = MOVE_IN_CELL_TEMPLATE.replace("{op}", ">")
MOVE_IN_CELL_AGAIN = MOVE_IN_CELL_TEMPLATE.replace("{op}", ">=")
KEEP_AND_PLACE = KEEP_AND_PLACE_TEMPLATE.replace("{op}", ">")
KEEP_AND_PLACE_AGAIN = KEEP_AND_PLACE_TEMPLATE.replace("{op}", ">=")

FORGET = """
local known = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if not known then return -1 end
return tonumber(string.sub(known, string.find(known, ' ', 1, true) + 1))
"""


class RedisLiveStore:
    """LiveStore on Redis or Redis Cluster; see the module docstring."""

    def __init__(self, redis: Connection, prefix: str = "trk:") -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix may not contain braces")
        self.redis = redis
        self.prefix = prefix
        self._losses = 0  # times state was (or may have been) lost
        self._repaired = 0  # losses a finished rebuild has made good
        self._server_ids: dict[str, str] = {}
        # (tenant, bucket) or (tenant, -1 - cell): the pair's key names
        self._key_pairs: dict[tuple[str, int], tuple[str, str]] = {}

    @classmethod
    async def open(cls, url: str, prefix: str = "trk:") -> RedisLiveStore:
        """A store on the Redis at ``url``; if it is down, one that waits for it."""
        store = cls(Connection(url), prefix)
        try:
            await store.ping()
        except Unavailable as exc:
            log.warning("starting without live state (%s); will rebuild", exc.message)
            store.lost_state()
        return store

    @property
    def needs_rebuild(self) -> bool:
        """Whether live state may lack updates that history has (until a rebuild)."""
        return self._losses > self._repaired

    def lost_state(self) -> None:
        """Note that updates were (or may have been) lost: a rebuild is needed."""
        self._losses += 1

    def rebuild_started(self) -> int:
        """A mark to hand to ``rebuild_done`` once the rebuild has finished."""
        return self._losses

    def rebuild_done(self, mark: int) -> None:
        """The losses up to ``mark`` are made good (later ones still need one)."""
        self._repaired = max(self._repaired, mark)

    async def update(self, batch: FixBatch) -> FixBatch:
        return await self._update(batch, again=False)

    async def repair(self, batch: FixBatch) -> FixBatch:
        """Like ``update``, but a fix equal to the stored one is applied again, so
        that a GEO move lost to a partial failure is made (used by rebuilds)."""
        return await self._update(batch, again=True)

    async def mend_index(self, tenant: str) -> int:
        """Take devices out of the GEO sets of cells they have left; the count.

        A rebuild's ``repair`` places each device in its cell again but knows no
        cell it left: a leave lost after its update (the second call timed out,
        the process died between the calls) stays lost unless the tenant's GEO
        sets are read. A leave goes through the cell's time check at the live
        fix's time, so one racing a later move into that cell changes nothing."""
        with unavailable("live GEO index"):
            client = await self.redis.get()
            used = await client.smembers(keys.cells_key(self.prefix, tenant))
        cells = sorted(int(c) for c in used)
        left = 0
        for first in range(0, len(cells), MEND_CELLS):
            left += await self._mend_cells(tenant, cells[first : first + MEND_CELLS])
        return left

    async def _mend_cells(self, tenant: str, cells: list[int]) -> int:
        """``mend_index`` for some of the tenant's cells."""
        with unavailable("live GEO index"):
            client = await self.redis.get()
            async with client.pipeline(transaction=False) as pipe:
                for cell in cells:
                    pipe.zrange(keys.geo_key(self.prefix, tenant, cell), 0, -1)
                replies = await pipe.execute()
        members = [d.decode() for reply in replies for d in reply]
        member_cells = np.repeat(cells, [len(reply) for reply in replies])
        found = await self.get(tenant, members)
        row = {device: i for i, device in enumerate(found.device.tolist())}
        now_in = keys.cell_of(found.lat, found.lon)
        stale = [
            (row[device], cell)
            for device, cell in zip(members, member_cells.tolist(), strict=True)
            if device in row and now_in[row[device]] != cell
        ]
        if stale:
            rows, left_cells = zip(*stale, strict=True)
            moved = found.take(np.array(rows, dtype=np.intp))
            await self._move(moved, np.array(left_cells), again=True, placed=True)
        return len(stale)

    async def _update(self, batch: FixBatch, again: bool) -> FixBatch:
        if len(batch) == 0:
            return batch
        newest = batch.take(batch.newest_per_device())
        try:
            with unavailable("live positions"):
                one_call = len(newest) <= SINGLE_CALL_ROWS and not await self._cluster()
            if one_call:
                accepted, previous = await self._keep_and_place(newest, again)
            else:
                accepted, previous = await self._keep_newest(newest, again)
            moved = newest.take(accepted)
            await self._move(moved, previous, again, placed=one_call)
        except Unavailable:
            self.lost_state()
            raise
        return moved

    async def get(self, tenant: str, devices: Sequence[str]) -> FixBatch:
        names = np.asarray(list(dict.fromkeys(devices)), dtype=object)
        if names.size == 0:
            return FixBatch.empty(tenant)
        buckets = keys.bucket_of(names)
        groups = [np.flatnonzero(buckets == b) for b in np.unique(buckets)]
        with unavailable("live positions"):
            client = await self.redis.get()
            async with client.pipeline(transaction=False) as pipe:
                for rows in groups:
                    key = keys.live_key(self.prefix, tenant, int(buckets[rows[0]]))
                    pipe.hmget(key, names[rows].tolist())
                replies = await pipe.execute()
        order = np.concatenate(groups)
        values = [v for reply in replies for v in reply]
        found = np.array([v is not None for v in values], dtype=bool)
        batch = _decode(tenant, names[order][found], [v for v in values if v])
        return batch.take(np.argsort(order[found], kind="stable"))

    async def nearby(
        self, tenant: str, lat: float, lon: float, radius_m: float, limit: int
    ) -> tuple[FixBatch, np.ndarray]:
        lat, lon, radius_m = float(lat), float(lon), float(radius_m)
        candidates = await self._candidates(tenant, lat, lon, radius_m, int(limit))
        found = await self.get(tenant, candidates)
        distance = keys.distance_m(lat, lon, found.lat, found.lon)
        inside = np.flatnonzero(distance <= radius_m)
        order = inside[np.argsort(distance[inside], kind="stable")][:limit]
        return found.take(order), distance[order]

    async def snapshot(self, tenant: str) -> FixBatch:
        with unavailable("live positions"):
            client = await self.redis.get()
            async with client.pipeline(transaction=False) as pipe:
                for bucket in range(keys.BUCKETS):
                    pipe.hgetall(keys.live_key(self.prefix, tenant, bucket))
                replies = await pipe.execute()
        devices = [d.decode() for reply in replies for d in reply]
        records = [r for reply in replies for r in reply.values()]
        return _decode(tenant, np.array(devices, dtype=object), records)

    async def remove(self, tenant: str, devices: Sequence[str]) -> None:
        """Two round trips for any number of devices: their live entries, then
        their places in the GEO cells the first answers named."""
        names = list(dict.fromkeys(devices))
        if not names:
            return
        buckets = keys.bucket_of(np.array(names, dtype=object)).tolist()

        def forget(pipe: Any) -> None:
            for device, bucket in zip(names, buckets, strict=True):
                live_keys = [
                    keys.live_key(self.prefix, tenant, bucket),
                    keys.live_time_key(self.prefix, tenant, bucket),
                ]
                _evalsha(pipe, FORGET, live_keys, [device])

        with unavailable("live positions"):
            cells = [int(c) for c in await self._pipelined(forget)]
            placed = [(d, c) for d, c in zip(names, cells, strict=True) if c >= 0]
            if placed:
                client = await self.redis.get()
                async with client.pipeline(transaction=False) as pipe:
                    for device, cell in placed:
                        pipe.zrem(keys.geo_key(self.prefix, tenant, cell), device)
                        pipe.hdel(keys.geo_time_key(self.prefix, tenant, cell), device)
                    await pipe.execute()

    async def ping(self) -> None:
        """Raise Unavailable unless Redis answers; notice restarts (state lost)."""
        with unavailable("Redis"):
            ids = await self._run_ids()
        restarted = {n for n, run in ids.items() if self._server_ids.get(n, run) != run}
        if restarted:
            log.warning("Redis restarted (%s): live state must be rebuilt", restarted)
            self.lost_state()
        self._server_ids |= ids

    async def close(self) -> None:
        await self.redis.close()

    async def _pipelined(self, queue: Callable[[Any], None]) -> list[Any]:
        """Run what ``queue`` adds in one pipeline."""
        return await self._with_scripts(lambda: self._execute(queue))

    async def _call(self, script: str, script_keys: list[str], args: list) -> Any:
        """One script call, outside a pipeline (a pipeline of one call costs
        more)."""

        async def call() -> Any:
            client = await self.redis.get()
            sha = SHA[script]
            return await client.evalsha(sha, len(script_keys), *script_keys, *args)

        return await self._with_scripts(call)

    async def _with_scripts(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call``, once more after loading the scripts if Redis lacks them (a
        new or restarted Redis, a failover)."""
        try:
            return await call()
        except NoScriptError:
            client = await self.redis.get()
            for script in SCRIPTS.values():
                await client.script_load(script)
            return await call()

    async def _execute(self, queue: Callable[[Any], None]) -> list[Any]:
        client = await self.redis.get()
        async with client.pipeline(transaction=False) as pipe:
            queue(pipe)
            return await pipe.execute()

    async def _run_ids(self) -> dict[str, str]:
        client = await self.redis.get()
        if is_cluster(client):
            primaries = client.get_primaries()
            replies = await client.info("server", target_nodes=primaries)
            if len(primaries) == 1:  # one node's reply comes back unwrapped
                replies = {primaries[0].name: replies}
            return {node: info["run_id"] for node, info in replies.items()}
        info = await client.info("server")
        return {"single": info["run_id"]}

    async def _keep_newest(
        self, newest: FixBatch, again: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Write fixes newer than the stored ones; their rows and previous cells."""
        tenant = newest.tenant
        buckets = keys.bucket_of(newest.device)
        cells = keys.cell_of(newest.lat, newest.lon)
        records = _records(newest)
        devices = newest.device.tolist()
        stamps = [
            f"{t} {c}"
            for t, c in zip(newest.time_ms.tolist(), cells.tolist(), strict=True)
        ]
        script = KEEP_SAME_OR_NEWER if again else KEEP_NEWER
        bucket_keys = partial(self._bucket_keys, tenant)

        with unavailable("live positions"):
            calls = _calls(buckets, await self._cluster())

        def queue(pipe: Any) -> None:
            for groups, rows in calls:
                args = [
                    _joined(devices, rows),
                    _joined(stamps, rows),
                    records[rows].tobytes(),
                    RECORD.itemsize,
                ]
                _evalsha_groups(pipe, script, groups, bucket_keys, args)

        with unavailable("live positions"):
            replies = await self._pipelined(queue)
        accepted, previous = [], []
        for (_, rows), reply in zip(calls, replies, strict=True):
            pairs = np.frombuffer(reply, dtype="<i4").reshape(-1, 2)
            accepted.append(np.asarray(rows, dtype=np.intp)[pairs[:, 0]])
            previous.append(pairs[:, 1].astype(np.int64))
        return np.concatenate(accepted), np.concatenate(previous)

    async def _keep_and_place(
        self, newest: FixBatch, again: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """``_keep_newest`` and the placing half of ``_move`` in one script call
        (a small update on a single Redis); the same answer as ``_keep_newest``."""
        tenant = newest.tenant
        buckets = keys.bucket_of(newest.device)
        cells = keys.cell_of(newest.lat, newest.lon)
        used, slot = np.unique(cells, return_inverse=True)
        [(groups, rows)] = _calls(buckets, cluster=False)
        stamps = [
            f"{t} {c}"
            for t, c in zip(newest.time_ms.tolist(), cells.tolist(), strict=True)
        ]
        geo_lat = np.clip(newest.lat, -keys.GEO_MAX_LAT, keys.GEO_MAX_LAT)
        script_keys = [
            *chain.from_iterable(self._bucket_keys(tenant, b) for b in groups),
            *chain.from_iterable(self._cell_keys(tenant, c) for c in used.tolist()),
            keys.cells_key(self.prefix, tenant),
        ]
        args = [
            _joined(newest.device.tolist(), rows),
            _joined(stamps, rows),
            _records(newest)[rows].tobytes(),
            RECORD.itemsize,
            " ".join(str(n) for n in groups.values()),
            _joined([str(s + 1) for s in slot.tolist()], rows),
            _joined([repr(x) for x in newest.lon.tolist()], rows),
            _joined([repr(x) for x in geo_lat.tolist()], rows),
            "\n".join(str(c) for c in used.tolist()),
        ]
        script = KEEP_AND_PLACE_AGAIN if again else KEEP_AND_PLACE
        with unavailable("live positions"):
            reply = await self._call(script, script_keys, args)
        pairs = np.frombuffer(reply, dtype="<i4").reshape(-1, 2)
        accepted = np.asarray(rows, dtype=np.intp)[pairs[:, 0]]
        return accepted, pairs[:, 1].astype(np.int64)

    async def _move(
        self, moved: FixBatch, previous: np.ndarray, again: bool, placed: bool = False
    ) -> None:
        """Place moved devices in their cell's GEO set, out of the one they left;
        only the latter if ``placed`` (``_keep_and_place`` did the former)."""
        if len(moved) == 0:
            return
        tenant = moved.tenant
        cells = keys.cell_of(moved.lat, moved.lon)
        left = np.flatnonzero((previous >= 0) & (previous != cells))
        if placed and left.size == 0:
            return
        entered = np.arange(0 if placed else len(moved))
        rows = np.concatenate([entered, left])
        op_cells = np.concatenate([cells[entered], previous[left]])
        entering = np.arange(len(rows)) < len(entered)
        devices = moved.device[rows].tolist()
        times = [str(t) for t in moved.time_ms[rows].tolist()]
        geo_lat = np.clip(moved.lat[rows], -keys.GEO_MAX_LAT, keys.GEO_MAX_LAT)
        lons = [repr(x) for x in moved.lon[rows].tolist()]
        lats = [repr(x) for x in geo_lat.tolist()]
        script = MOVE_IN_CELL_AGAIN if again else MOVE_IN_CELL
        cell_keys = partial(self._cell_keys, tenant)

        with unavailable("live GEO index"):
            calls = _calls(op_cells, await self._cluster())

        def queue(pipe: Any) -> None:
            for groups, ops in calls:
                enter = "".join("1" if entering[op] else "0" for op in ops)
                args = [
                    _joined(devices, ops),
                    _joined(times, ops),
                    _joined(lons, ops),
                    _joined(lats, ops),
                    enter,
                ]
                _evalsha_groups(pipe, script, groups, cell_keys, args)
            if not placed:
                pipe.sadd(
                    keys.cells_key(self.prefix, tenant), *np.unique(cells).tolist()
                )

        with unavailable("live GEO index"):
            await self._pipelined(queue)

    async def _cluster(self) -> bool:
        return is_cluster(await self.redis.get())

    def _bucket_keys(self, tenant: str, bucket: int) -> tuple[str, str]:
        """A device bucket's live hash and time hash."""
        return self._key_pair(tenant, bucket, keys.live_key, keys.live_time_key)

    def _cell_keys(self, tenant: str, cell: int) -> tuple[str, str]:
        """A cell's GEO set and time hash."""
        return self._key_pair(tenant, -1 - cell, keys.geo_key, keys.geo_time_key)

    def _key_pair(
        self,
        tenant: str,
        number: int,
        first: Callable[[str, str, int], str],
        second: Callable[[str, str, int], str],
    ) -> tuple[str, str]:
        """A bucket's (``number`` >= 0) or a cell's (``-1 - cell``) key pair, kept
        for the next update: the names cost more to build than the rest of a
        small update's arguments. Forgotten wholesale past ``KEY_PAIRS_KEPT``."""
        pair = self._key_pairs.get((tenant, number))
        if pair is None:
            if len(self._key_pairs) >= KEY_PAIRS_KEPT:
                self._key_pairs.clear()
            group = number if number >= 0 else -1 - number
            pair = (
                first(self.prefix, tenant, group),
                second(self.prefix, tenant, group),
            )
            self._key_pairs[(tenant, number)] = pair
        return pair

    async def _candidates(
        self, tenant: str, lat: float, lon: float, radius_m: float, limit: int
    ) -> list[str]:
        """Devices that may lie within the circle: from the GEO sets of its cells."""
        with unavailable("live GEO index"):
            client = await self.redis.get()
            used = await client.smembers(keys.cells_key(self.prefix, tenant))
            used_cells = np.array([int(c) for c in used], dtype=np.int64)
            cells = np.intersect1d(
                keys.cells_for_circle(lat, lon, radius_m), used_cells
            )
            scan_all = keys.is_polar(cells) | (abs(lat) > keys.GEO_MAX_LAT)
            async with client.pipeline(transaction=False) as pipe:
                for cell, scan in zip(cells.tolist(), scan_all.tolist(), strict=True):
                    key = keys.geo_key(self.prefix, tenant, cell)
                    if scan:
                        pipe.zrange(key, 0, -1)
                    else:
                        pipe.geosearch(
                            key,
                            longitude=lon,
                            latitude=lat,
                            radius=radius_m * 1.001 + 1.0,
                            unit="m",
                            sort="ASC",
                            count=limit,
                        )
                replies = await pipe.execute()
        return list(dict.fromkeys(d.decode() for reply in replies for d in reply))


SCRIPTS = {
    hashlib.sha1(text.encode()).hexdigest(): text
    for text in (
        KEEP_NEWER,
        KEEP_SAME_OR_NEWER,
        MOVE_IN_CELL,
        MOVE_IN_CELL_AGAIN,
        KEEP_AND_PLACE,
        KEEP_AND_PLACE_AGAIN,
        FORGET,
    )
}
SHA = {text: sha for sha, text in SCRIPTS.items()}


def _evalsha(pipe: Any, script: str, script_keys: list[str], args: list) -> None:
    pipe.evalsha(SHA[script], len(script_keys), *script_keys, *args)


def _evalsha_groups(
    pipe: Any,
    script: str,
    groups: dict[int, int],
    group_keys: Callable[[int], tuple[str, str]],
    args: list,
) -> None:
    """Queue a call of a group script (see LUA_GROUPS): the key pair of each group,
    then ``args``, then the groups' row counts."""
    script_keys = [key for group in groups for key in group_keys(group)]
    sizes = " ".join(str(n) for n in groups.values())
    _evalsha(pipe, script, script_keys, [*args, sizes])


def _records(batch: FixBatch) -> np.ndarray:
    """The batch as packed records, one per row."""
    table = np.empty(len(batch), dtype=RECORD)
    for name in RECORD_NAMES:
        table[name] = getattr(batch, name)
    return table


def _calls(groups: np.ndarray, cluster: bool) -> list[tuple[dict[int, int], list[int]]]:
    """How to split rows over script calls by group (bucket or cell): each call's
    groups with their row counts, and its rows, group after group. A cluster gets
    one call per group (a script's keys share a slot); a single Redis one call for
    an update of up to ``SINGLE_CALL_ROWS`` rows, one per group beyond that."""
    order = np.argsort(groups, kind="stable")
    values, counts = np.unique(groups[order], return_counts=True)
    bounds = np.r_[0, np.cumsum(counts)].tolist()
    pairs = list(zip(values.tolist(), counts.tolist(), strict=True))
    rows = order.tolist()
    if not cluster and len(rows) <= SINGLE_CALL_ROWS:
        return [(dict(pairs), rows)]
    return [
        ({group: count}, rows[bounds[i] : bounds[i + 1]])
        for i, (group, count) in enumerate(pairs)
    ]


def _joined(values: list[str], rows: list[int]) -> str:
    """The values of ``rows`` as one script argument (see LUA_HELPERS)."""
    return "\n".join([values[i] for i in rows])


def _decode(tenant: str, devices: np.ndarray, records: list[bytes]) -> FixBatch:
    table = np.frombuffer(b"".join(records), dtype=RECORD)
    columns = {name: table[name].copy() for name in RECORD_NAMES}
    columns["provider"] = columns["provider"].astype(np.int32)  # stored fixes: 0-6
    return FixBatch(tenant=tenant, device=np.asarray(devices, dtype=object), **columns)
