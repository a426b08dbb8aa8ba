"""Notices about devices between server processes, on Redis Streams: erasures
(``<prefix>erasures``) and route changes (``<prefix>routes``).

Stored data is shared, so the process that answers ``EraseDevice`` erases it for
everyone; in-process state (live activity, geofence memberships, monitored routes)
is each process's own. After erasing, that process appends the tenant and device
to one stream (``<prefix>erasures``, one key, so one slot on a Redis Cluster) and
every other process that shares the Redis forgets the device's state when it reads
the notice.

Each process reads the stream with a blocking XREAD from the last entry it handled,
so a notice reaches every live process at least once: one whose connection breaks,
or whose Redis fails over, reads what was appended meanwhile when it is back. It
starts after the newest entry (its state is empty then), or from the beginning of a
stream that does not exist yet. A stream whose newest entry is behind the last one
handled (Redis lost its data and its clock is behind) or that is gone is read again
from its beginning.

The stream keeps about ``MAXLEN`` entries and none older than ``KEEP_MS``: a process
cut off from Redis for longer than that many entries, or than a day, misses the
notices trimmed meanwhile (a warning says so when the stream still holds later
ones) and keeps those devices' state until it restarts. A notice holds a device id
(no positions) and is gone from Redis after those bounds. A notice Redis
acknowledged but lost in a failover before its replica had it is lost for every
reader.

Route notices (``subject`` "route", ``routing.assignments``) go the same way on
their own stream: a device's assigned route changed in the store, or (a notice of
the kind "held", handled by ``others``) another process took its monitoring over.
Geofence take-overs (``subject`` "fence holder", ``geofence.processor``) have a
stream of their own, ``<prefix>fence-holders``; their listener also hears its own
process's notices (``own``), to tell which of two take-overs of a device is the
later in the stream.
Many devices are announced at once (a reconnect storm moving devices to one
process) in one entry per ``ANNOUNCE_PIECE`` devices (a ``devices`` field, a JSON
list), a few entries to a pipeline: a burst of ten thousand devices is ten entries,
far below ``MAXLEN``, so no part of it is trimmed before a listener reads it. A
notice of one device stays an entry with a ``device`` field, as before; a listener
reads both forms, so entries written by an older version during an upgrade are
heard (an older listener drops the many-device entries as undecodable, with a
warning, until it is upgraded too).

This class was ``RedisErasureNotices`` in ``storage.redis_erasure``; the stream keys
and the entries are unchanged, so processes of both versions hear each other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from redis.exceptions import RedisClusterException, RedisError, ResponseError

from tracking_grpc.errors import Unavailable
from tracking_grpc.storage.redis_client import Client, Connection, unavailable
from tracking_grpc.storage.redis_pubsub import RETRY_S

log = logging.getLogger(__name__)

STREAM = "erasures"  # after redis_key_prefix
MAXLEN = 10_000  # notices kept, approximately (Redis trims whole nodes)
KEEP_MS = 24 * 3600 * 1000  # and no notice older than a day
BLOCK_MS = 1_000  # one XREAD's wait; below redis_client.TIMEOUTS' socket timeout
READ_COUNT = 1_000  # entries per XREAD (an entry may name ANNOUNCE_PIECE devices)
ANNOUNCE_PIECE = 1_000  # devices per entry of an announcement of many
PIPELINE_ENTRIES = 20  # entries per pipeline (one round trip) of an announcement
START_WAIT_S = 10.0
FIRST = "0-0"

Forget = Callable[[str, str], Awaitable[object]]


class RedisDeviceNotices:
    """Notices naming a device, on one stream: announces this process's, and acts
    on the others' (by default erasures: forgets the devices others erased; with
    another ``stream`` and ``subject``, other news of a device, such as a route
    change, and notices of other kinds through ``others``)."""

    def __init__(
        self,
        connection: Connection,
        prefix: str,
        forget: Forget,
        *,
        stream: str = STREAM,
        subject: str = "erasure",
        heard_level: int = logging.INFO,
        others: Mapping[str, Forget] | None = None,
        own: Forget | None = None,
    ) -> None:
        self.connection = connection
        self.stream = prefix + stream
        self.subject = subject
        self.heard_level = heard_level  # of the line logged per notice acted on
        self.others = dict(others or {})  # kind: what a notice of that kind calls
        self.forget = forget
        # Called for each device of this process's own notices as the stream
        # brings them back (where their order among the others' matters).
        self.own = own
        self.process = uuid.uuid4().hex[:16]
        self.heard = 0  # notices of other processes acted on
        self.last_id: str | None = None  # of the last notice handled
        self._task: asyncio.Task[None] | None = None
        self._tried = asyncio.Event()

    async def start(self) -> None:
        """Listen; returns once reading, or after a failed try (then retried in
        the background)."""
        self._task = asyncio.create_task(self._listen(), name=f"{self.subject}-notices")
        await asyncio.wait_for(self._tried.wait(), START_WAIT_S)

    async def announce(self, tenant: str, device: str, kind: str = "") -> None:
        """Tell the other processes that ``device`` of ``tenant`` was erased (or
        what this ``subject`` says of a device; a ``kind`` names one of
        ``others``)."""
        await self.announce_many(tenant, [device], kind)

    async def announce_many(
        self, tenant: str, devices: Sequence[str], kind: str = ""
    ) -> None:
        """:meth:`announce` for each of ``devices``: one entry per
        ``ANNOUNCE_PIECE`` devices (one device: an entry in the single-device
        form), sent in pipelines of ``PIPELINE_ENTRIES`` entries (a round trip
        each), trimmed once per pipeline. A failed pipeline raises
        ``Unavailable``; the pieces before it were sent."""
        base: dict[Any, Any] = {"process": self.process, "tenant": tenant}
        if kind:
            base["kind"] = kind
        pieces = [
            devices[first : first + ANNOUNCE_PIECE]
            for first in range(0, len(devices), ANNOUNCE_PIECE)
        ]
        with unavailable(f"{self.subject} notices"):
            client = await self.connection.get()
            for first in range(0, len(pieces), PIPELINE_ENTRIES):
                oldest = f"{time.time_ns() // 1_000_000 - KEEP_MS}-0"
                async with client.pipeline(transaction=False) as pipe:
                    for piece in pieces[first : first + PIPELINE_ENTRIES]:
                        notice = {**base, **_naming(piece)}
                        pipe.xadd(self.stream, notice, maxlen=MAXLEN, approximate=True)
                    pipe.xtrim(self.stream, minid=oldest, approximate=False)
                    pipe.pexpire(self.stream, KEEP_MS)
                    await pipe.execute()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.connection.close()

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                client = await self.connection.get()
                await self._position(client, resumed=failures > 0)
                self._tried.set()
                if failures:
                    log.warning(
                        "%s notices read again after %s", self.subject, self.last_id
                    )
                failures = 0
                await self._read(client)
            except (RedisError, RedisClusterException, OSError, Unavailable) as exc:
                self._tried.set()
                delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "%s notices lost (%s); retry in %.1fs",
                    self.subject,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _read(self, client: Client) -> None:
        """Handle the notices after ``last_id`` as they come; check the position
        whenever a wait brings none."""
        while True:
            assert self.last_id is not None
            found: Any = await client.xread(
                {self.stream: self.last_id}, count=READ_COUNT, block=BLOCK_MS
            )
            if not found:
                await self._position(client)
                continue
            for entry_id, fields in found[0][1]:
                await self._heard(fields)
                self.last_id = _text(entry_id)

    async def _position(self, client: Client, resumed: bool = False) -> None:
        """Set where reading goes on: after the newest notice at the first
        connection; from the start of a stream that is gone or behind."""
        info = await _stream_info(client, self.stream)
        newest = FIRST if info is None else _text(info["last-generated-id"])
        if self.last_id is None:
            self.last_id = newest
            log.debug("%s notices read after %s", self.subject, newest)
        elif _order(newest) < _order(self.last_id):
            if info is not None:
                log.warning(
                    "%s notices behind the last one read: from the start",
                    self.subject,
                )
            self.last_id = FIRST
        elif resumed and info is not None and self.last_id != FIRST:
            first = info.get("first-entry")
            # A stream that never lost an entry (one made anew after Redis lost its
            # data, say) starts later than the last notice read, with nothing
            # trimmed (entries-added: Redis 7).
            trimmed = info.get("entries-added", math.inf) > info.get("length", 0)
            if trimmed and first and _order(_text(first[0])) > _order(self.last_id):
                log.warning(
                    "%s notices after %s were trimmed before this process read "
                    "them: devices named meanwhile may keep their in-process state "
                    "here until it restarts",
                    self.subject,
                    self.last_id,
                )

    async def _heard(self, fields: dict[bytes, bytes]) -> None:
        try:
            process = _text(fields[b"process"])
            tenant = _text(fields[b"tenant"])
            devices = _devices(fields)
            kind = _text(fields.get(b"kind", b""))
        except (KeyError, ValueError):  # UnicodeDecodeError is a ValueError
            log.warning("dropped an undecodable %s notice", self.subject)
            return
        if process == self.process:
            if self.own is not None and not kind:
                for device in devices:
                    await self.own(tenant, device)
            return
        act = self.others.get(kind) if kind else self.forget
        if act is None:
            log.warning("dropped a %s notice of unknown kind %r", self.subject, kind)
            return
        for device in devices:
            await self._act(act, tenant, device)

    async def _act(self, act: Forget, tenant: str, device: str) -> None:
        try:
            forgotten = await act(tenant, device)
        except Exception:
            log.exception(
                "acting on a %s notice of tenant %s failed", self.subject, tenant
            )
            return
        self.heard += 1
        log.log(
            self.heard_level,
            "%s notice of device %r of tenant %s from another process: %s",
            self.subject,
            device,
            tenant,
            forgotten,
        )


def _naming(devices: Sequence[str]) -> dict[str, str]:
    """The fields of an entry naming ``devices``: one in the single-device form
    (readable by every version), more as a JSON list."""
    if len(devices) == 1:
        return {"device": devices[0]}
    return {"devices": json.dumps(list(devices))}


def _devices(fields: dict[bytes, bytes]) -> list[str]:
    """The devices an entry names, in either form; ValueError when undecodable."""
    if b"devices" not in fields:
        return [_text(fields[b"device"])]
    devices = json.loads(fields[b"devices"])
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise ValueError("devices is not a list of strings")
    return devices


async def _stream_info(client: Client, stream: str) -> dict[str, Any] | None:
    """XINFO STREAM of ``stream``, or None when it does not exist."""
    try:
        return await client.xinfo_stream(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise


def _order(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
