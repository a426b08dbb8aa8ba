"""Cross-process fan-out of live updates, routed to the processes that want them.

Each server process keeps its watchers' interest (:mod:`tracking_grpc.interest`) in
the interest table (:mod:`redis_interest`) and listens on a channel of its own. A
publisher caches the table and sends each process only the rows its interest
matches; on a Redis Cluster by sharded pub/sub (SPUBLISH), the per-process channels
spread over the slots. Updates of a tenant nobody watches are not sent at all, and
a process with no watchers receives nothing. A process's own watchers get its
updates directly.

Ordering. A Watch adds its watcher, then waits until the interest is in the table
and the table's version bumped (``interest_changed``), and only then reads its
snapshot. A publisher sends with its cached table and, in the same pipeline, reads
the version; that read starts after the update's live write has completed. So if
the live write came after the snapshot read (the snapshot missed the update), then
the registration, the snapshot read, the live write and the version read happened
in that order, and the version read sees the registration's bump or a later one. If
it equals the cached version, the cached table already held the registration;
otherwise the publisher reads the table again and sends each process the rows its
new interest matches that the cached one did not. Either way the update reaches the
watcher. Versions never repeat (see :mod:`redis_interest`).

Pub/sub delivers at most once: a subscriber disconnected for a while misses what was
published meanwhile. A process registers its interest again when it subscribes again
and whenever a heartbeat finds its entry gone (Redis lost its data, or the process
stalled past its expiry), and once that is written it calls the subscriber's
``catch_up``, which offers its watchers the current state from the live store: every
update whose live write starts later is routed to it again, so the two together miss
nothing (the ordering argument above, with ``catch_up`` as the snapshot read). The
entry of a process that dies expires ``interest_ttl_s`` after its last heartbeat,
and until then publishers send to a channel nobody reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import Unavailable
from tracking_grpc.interest import Interest, TenantInterest
from tracking_grpc.observability import metrics
from tracking_grpc.storage import redis_pubsub
from tracking_grpc.storage.base import CatchUp, UpdateHandler
from tracking_grpc.storage.redis_client import Connection, is_cluster, unavailable
from tracking_grpc.storage.redis_interest import Entry, InterestTable
from tracking_grpc.storage.redis_live import RECORD, RECORD_NAMES

log = logging.getLogger(__name__)

HEADER = struct.Struct("<I")

Routes = dict[str, TenantInterest]  # channel -> interest, for one tenant


def encode(batch: FixBatch) -> bytes:
    """A batch as bytes: a JSON header (tenant, devices) and the packed fix records."""
    return _encode(batch.tenant, batch.device.tolist(), records(batch))


def records(batch: FixBatch) -> np.ndarray:
    """The batch's fixes as packed records, one per row."""
    table = np.empty(len(batch), dtype=RECORD)
    for name in RECORD_NAMES:
        table[name] = getattr(batch, name)
    return table


def _encode(tenant: str, devices: list[str], table: np.ndarray) -> bytes:
    head = json.dumps({"tenant": tenant, "devices": devices}).encode()
    return HEADER.pack(len(head)) + head + table.tobytes()


def decode(data: bytes) -> FixBatch:
    (size,) = HEADER.unpack_from(data)
    header = json.loads(data[HEADER.size : HEADER.size + size])
    table = np.frombuffer(data[HEADER.size + size :], dtype=RECORD)
    columns = {name: table[name].copy() for name in RECORD_NAMES}
    devices = np.array(header["devices"], dtype=object).reshape(-1)
    return FixBatch(tenant=header["tenant"], device=devices, **columns)


class RedisBroker:
    """Broker on Redis pub/sub, routed by the interest table; see the module."""

    def __init__(
        self, redis: Connection, prefix: str = "trk:", interest_ttl_s: float = 30.0
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.process = uuid.uuid4().hex[:16]
        self.channel = self.channel_of(self.process)
        self.table = InterestTable(redis, prefix)
        self.ttl_ms = int(interest_ttl_s * 1000)
        self.received_fixes = 0  # fixes that arrived from other processes
        self._handler: UpdateHandler | None = None
        self._interest: Callable[[], Interest] = dict
        self._catch_up: CatchUp | None = None
        # Publishing: the table as last read, and the routes of each tenant.
        self._version: bytes | None = None
        self._entries: dict[str, Entry] = {}
        self._routes: dict[str, Routes] = {}
        self._refreshing = asyncio.Lock()
        # Registering: what Redis holds (None: unknown) and who waits for a write.
        self._registered: dict[str, TenantInterest] | None = {}
        self._wanted = self._written = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task] = set()
        self._tried = asyncio.Event()

    @classmethod
    async def open(
        cls, url: str, prefix: str = "trk:", interest_ttl_s: float = 30.0
    ) -> RedisBroker:
        """A broker on the Redis at ``url``; it connects when Redis is there."""
        return cls(Connection(url), prefix, interest_ttl_s)

    def channel_of(self, process: str) -> str:
        return f"{self.prefix}fanout:{{{process}}}"

    async def publish(self, updates: FixBatch, local: bool = True) -> None:
        """Deliver to this process's watchers (unless not ``local``), and send
        other processes what their interest matches (see the module docstring for
        the ordering)."""
        if len(updates) == 0:
            return
        if self._handler is not None and local:
            await self._deliver(updates)
        with unavailable("live fan-out"):
            client = await self.redis.get()
            cached = self._routes.get(updates.tenant, {})
            sends = _messages(updates, cached, {})
            version = await self._send(client, sends, read_version=True)
            if version == self._version:
                return
            async with self._refreshing:
                if version != self._version:
                    await self._refresh()
            routes = self._routes.get(updates.tenant, {})
            await self._send(client, _messages(updates, routes, cached), False)

    async def subscribe(
        self,
        handler: UpdateHandler,
        interest: Callable[[], Interest],
        catch_up: CatchUp | None = None,
    ) -> None:
        """Call ``handler`` with updates that ``interest()`` wants, and ``catch_up``
        when updates may have been missed (see the module docstring); returns once
        subscribed, or after a failed try (then retried in the background)."""
        if self._handler is not None:
            raise RuntimeError("a broker takes one subscription")
        self._handler, self._interest = handler, interest
        self._catch_up = catch_up
        for job in (self._listen(), self._keep_alive()):
            self._tasks.add(asyncio.create_task(job, name="redis-broker"))
        await asyncio.wait_for(self._tried.wait(), timeout=10.0)

    async def interest_changed(self) -> None:
        """Returns once the interest as it is now is in the table (its version
        bumped), so every later publish routes by it; Unavailable if Redis is not."""
        self._wanted += 1
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((self._wanted, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_interest())
        await future

    async def ping(self) -> None:
        with unavailable("Redis pub/sub"):
            await (await self.redis.get()).ping()

    async def close(self) -> None:
        """Stop listening and leave the table (best effort: otherwise it expires)."""
        tasks = [*self._tasks, *([self._writer] if self._writer else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._registered != {}:
            try:
                async with asyncio.timeout(2.0):
                    await self.table.register(self.process, {}, self.ttl_ms)
            except (Unavailable, TimeoutError):
                log.debug("leaving the interest table failed", exc_info=True)
        await self.redis.close()

    async def _send(
        self, client: Any, sends: list[tuple[str, bytes]], read_version: bool
    ) -> bytes | None:
        """Publish ``sends`` and (if asked) read the table's version, in one trip."""
        if not sends:
            return await client.get(self.table.version) if read_version else None
        cluster = is_cluster(client)
        async with client.pipeline(transaction=False) as pipe:
            for channel, data in sends:
                if cluster:
                    pipe.spublish(channel, data)
                else:
                    pipe.publish(channel, data)
            if read_version:
                pipe.get(self.table.version)
            replies = await pipe.execute()
        return replies[-1] if read_version else None

    async def _refresh(self) -> None:
        """Read the table again (changed entries only) and rebuild the routes."""
        version, self._entries = await self.table.read(self._entries)
        routes: dict[str, Routes] = {}
        for process, (_, interest) in self._entries.items():
            if process == self.process:
                continue  # this process's watchers get its updates directly
            channel = self.channel_of(process)
            for tenant, wanted in interest.items():
                routes.setdefault(tenant, {})[channel] = wanted
        self._routes, self._version = routes, version

    async def _write_interest(self) -> None:
        """Write the interest until every waiter's request is covered; changes that
        arrive during a write share the next one."""
        try:
            while self._written < self._wanted:
                target = self._wanted
                error: Exception | None = None
                try:
                    interest = dict(self._interest())
                    if interest != self._registered:
                        self._registered = None
                        await self.table.register(self.process, interest, self.ttl_ms)
                        self._registered = interest
                except Exception as exc:
                    error = exc
                self._written = target
                done = [f for g, f in self._waiters if g <= target]
                self._waiters = [(g, f) for g, f in self._waiters if g > target]
                for future in done:
                    if future.done():
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
        finally:
            self._writer = None

    def _register_soon(self) -> None:
        """Write the interest again in the background (Redis may have lost it), then
        catch up on what was not routed here meanwhile."""
        self._registered = None
        task = asyncio.create_task(self._register_and_catch_up())
        self._tasks.add(task)
        task.add_done_callback(self._registered_again)

    async def _register_and_catch_up(self) -> None:
        await self.interest_changed()
        if self._catch_up is not None:
            await self._catch_up()

    def _registered_again(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug(
                "registering interest or catching up failed: %s", task.exception()
            )

    async def _keep_alive(self) -> None:
        """Heartbeat: keep this process's entry, expire dead processes' entries."""
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                present = await self.table.heartbeat(self.process, self.ttl_ms)
            except Unavailable as exc:
                log.debug("interest heartbeat failed: %s", exc.message)
                continue
            if not present and self._registered != {} and self._interest():
                log.warning("this process's watch interest was lost; registering")
                self._register_soon()

    async def _listen(self) -> None:
        """Receive and dispatch forever, resubscribing after connection losses."""
        await redis_pubsub.listen(
            self.redis,
            self.channel,
            self._dispatch,
            self._tried,
            "live fan-out",
            on_resubscribed=self._after_outage,
        )

    def _after_outage(self) -> None:
        if self._interest():  # Redis may have lost the table
            self._register_soon()

    async def _dispatch(self, data: bytes) -> None:
        try:
            batch = decode(data)
        except (ValueError, KeyError, struct.error):
            log.exception("dropped an undecodable live update")
            return
        self.received_fixes += len(batch)
        metrics.fanout_received(len(batch))
        await self._deliver(batch)

    async def _deliver(self, batch: FixBatch) -> None:
        if self._handler is None:
            return
        try:
            await self._handler(batch)
        except Exception:
            log.exception("live update handler %r failed", self._handler)


def _messages(
    updates: FixBatch, routes: Routes, sent: Routes
) -> list[tuple[str, bytes]]:
    """(channel, message) for each process whose interest in ``routes`` matches
    rows of ``updates`` that its interest in ``sent`` (already sent) did not."""
    if not routes:
        return []
    out = []
    names = updates.device.astype(str)
    table = records(updates)
    encoded: dict[bytes, bytes] = {}
    for channel, interest in routes.items():
        before = sent.get(channel)
        if before is interest:
            continue
        mask = interest.mask(updates, names)
        if before is not None:
            mask &= ~before.mask(updates, names)
        if not mask.any():
            continue
        key = np.packbits(mask).tobytes()
        data = encoded.get(key)
        if data is None:
            devices = updates.device[mask].tolist()
            data = encoded[key] = _encode(updates.tenant, devices, table[mask])
        out.append((channel, data))
    return out
