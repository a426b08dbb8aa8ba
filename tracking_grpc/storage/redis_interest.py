"""The interest table in Redis: which server process wants which live updates.

Three keys in one cluster slot (hash tag ``{fanout}``), changed only by the
scripts below, so that each change is atomic:

    <prefix>interest:{fanout}          hash process id -> "<stamp> <interest JSON>"
    <prefix>interest-alive:{fanout}    sorted set process id -> expiry (Redis ms)
    <prefix>interest-version:{fanout}  counter, bumped by every change of the table

Each change bumps the version, and the stamp of an entry is the version that wrote
it, so a reader that knows the stamps it holds fetches only the entries that
changed. The counter starts at Redis's clock in microseconds when it is created (or
re-created after Redis lost its data), so it never comes back to a value a
publisher has cached. A process refreshes its expiry by heartbeat; every heartbeat
also removes the entries of processes whose expiry has passed (they crashed).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from redis.exceptions import NoScriptError

from tracking_grpc.interest import Interest, TenantInterest
from tracking_grpc.storage.redis_client import Connection, unavailable

NOW_MS = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function bump()
    if redis.call('EXISTS', KEYS[3]) == 0 then
        redis.call('SET', KEYS[3], clock[1] .. string.format('%06d', clock[2]))
    end
    redis.call('INCR', KEYS[3])
    return redis.call('GET', KEYS[3])  -- as text: Lua would print 1.7e+15
end
"""

# KEYS: table, alive, version. ARGV: process id, interest JSON ('' to leave), ttl.
# Returns the new version (as text).
REGISTER = (
    NOW_MS
    + """
local version = bump()
if ARGV[2] == '' then
    redis.call('HDEL', KEYS[1], ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
else
    redis.call('HSET', KEYS[1], ARGV[1], version .. ' ' .. ARGV[2])
    redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[3]), ARGV[1])
end
return version
"""
)

# KEYS: table, alive, version. ARGV: process id, ttl. Extends the process's expiry
# if it has an entry and removes expired entries. Returns 1 if it has an entry.
HEARTBEAT = (
    NOW_MS
    + """
local present = redis.call('HEXISTS', KEYS[1], ARGV[1])
if present == 1 then
    redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[2]), ARGV[1])
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms)
if #dead > 0 then
    for i = 1, #dead do
        redis.call('HDEL', KEYS[1], dead[i])
        redis.call('ZREM', KEYS[2], dead[i])
    end
    bump()
end
return present
"""
)

# KEYS: table, version. ARGV: process id and stamp pairs the reader holds.
# Returns the version, then process id and entry pairs (entry '' if unchanged).
READ = """
local known = {}
for i = 1, #ARGV, 2 do
    known[ARGV[i]] = ARGV[i + 1]
end
local out = {redis.call('GET', KEYS[2]) or ''}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
    local entry = all[i + 1]
    local stamp = string.sub(entry, 1, string.find(entry, ' ', 1, true) - 1)
    out[#out + 1] = all[i]
    if known[all[i]] == stamp then
        out[#out + 1] = ''
    else
        out[#out + 1] = entry
    end
end
return out
"""

SHA = {
    text: hashlib.sha1(text.encode()).hexdigest()
    for text in (REGISTER, HEARTBEAT, READ)
}

Entry = tuple[bytes, dict[str, TenantInterest]]  # stamp, interest by tenant


class InterestTable:
    """Reads and writes the interest table of one key prefix."""

    def __init__(self, redis: Connection, prefix: str) -> None:
        self.redis = redis
        self.table = f"{prefix}interest:{{fanout}}"
        self.alive = f"{prefix}interest-alive:{{fanout}}"
        self.version = f"{prefix}interest-version:{{fanout}}"

    async def register(self, process: str, interest: Interest, ttl_ms: int) -> int:
        """Store (or, when empty, remove) a process's interest; the new version."""
        text = ""
        if interest:
            text = json.dumps({t: i.to_json() for t, i in interest.items()})
        keys = [self.table, self.alive, self.version]
        return int(await self._run(REGISTER, keys, [process, text, ttl_ms]))

    async def heartbeat(self, process: str, ttl_ms: int) -> bool:
        """Extend a process's entry and expire dead ones; whether it has an entry."""
        keys = [self.table, self.alive, self.version]
        return bool(await self._run(HEARTBEAT, keys, [process, ttl_ms]))

    async def read(self, held: dict[str, Entry]) -> tuple[bytes | None, dict]:
        """The version and every entry, reusing ``held`` where a stamp is unchanged."""
        args = [x for process, (stamp, _) in held.items() for x in (process, stamp)]
        reply = await self._run(READ, [self.table, self.version], args)
        entries: dict[str, Entry] = {}
        for i in range(1, len(reply), 2):
            process, entry = reply[i].decode(), reply[i + 1]
            if not entry:
                entries[process] = held[process]
                continue
            stamp, _, text = entry.partition(b" ")
            interest = {
                t: TenantInterest.from_json(i) for t, i in json.loads(text).items()
            }
            entries[process] = (stamp, interest)
        return reply[0] or None, entries

    async def _run(self, script: str, keys: list[str], args: list) -> Any:
        with unavailable("live fan-out interest"):
            client = await self.redis.get()
            try:
                return await client.evalsha(SHA[script], len(keys), *keys, *args)
            except NoScriptError:
                return await client.eval(script, len(keys), *keys, *args)
