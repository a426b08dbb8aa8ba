"""Open watches after an outage: the hub offers them the live store's positions.

While Redis is down live updates are skipped, and a process whose subscription was
lost misses what others published; the live store (rebuilt from history) then holds
what the watchers missed. ``WatchHub.catch_up`` offers it: each watcher gets the
positions newer than it was sent, and a watcher that skipped the snapshot only those
received since it opened.
"""

from __future__ import annotations

import asyncio

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.fanout import Watcher, WatchFilter, WatchHub
from tracking_grpc.storage.memory import LocalBroker, MemoryLiveStore

OPENED_MS = 1_750_000_000_000


def positions(*rows: tuple[str, int, int]) -> FixBatch:
    """(device, seq, received_ms) rows, one second apart in fix time."""
    devices, seqs, received = zip(*rows, strict=True)
    times = [OPENED_MS - 60_000 + 1000 * s for s in seqs]
    return FixBatch.from_columns(
        "t", devices, seqs, times, [50.0] * len(rows), [8.0] * len(rows),
        received_ms=received,
    )  # fmt: skip


async def next_seqs(watcher: Watcher) -> dict[str, int]:
    updates = await asyncio.wait_for(watcher.next_updates(), 1.0)
    return dict(zip(updates.device.tolist(), updates.seq.tolist(), strict=True))


async def hub_with(live: MemoryLiveStore, *watchers: Watcher) -> WatchHub:
    hub = WatchHub(LocalBroker(), live)
    await hub.start()
    for watcher in watchers:
        await hub.add(watcher)
    return hub


async def test_a_watcher_gets_only_positions_newer_than_it_was_sent() -> None:
    live = MemoryLiveStore()
    await live.update(positions(("a", 1, OPENED_MS), ("b", 1, OPENED_MS)))
    watcher = Watcher("t", WatchFilter())
    watcher.mark_sent(await live.snapshot("t"))  # its snapshot
    hub = await hub_with(live, watcher)
    await live.update(positions(("b", 2, OPENED_MS + 5)))  # not published: lost
    await hub.catch_up()
    assert await next_seqs(watcher) == {"b": 2}


async def test_a_watcher_that_skipped_the_snapshot_gets_what_came_since() -> None:
    live = MemoryLiveStore()
    await live.update(positions(("a", 1, OPENED_MS - 5), ("b", 1, OPENED_MS - 5)))
    watcher = Watcher("t", WatchFilter(), since_ms=OPENED_MS)
    hub = await hub_with(live, watcher)
    await live.update(positions(("b", 2, OPENED_MS + 5)))
    await hub.catch_up()
    assert await next_seqs(watcher) == {"b": 2}


async def test_catch_up_keeps_to_each_watchers_filter_and_tenant() -> None:
    live = MemoryLiveStore()
    await live.update(positions(("a", 1, OPENED_MS), ("b", 1, OPENED_MS)))
    only_a = Watcher("t", WatchFilter(devices=frozenset({"a"})))
    other_tenant = Watcher("u", WatchFilter())
    hub = await hub_with(live, only_a, other_tenant)
    await hub.catch_up()
    assert await next_seqs(only_a) == {"a": 1}
    assert other_tenant._pending == {}
