"""The group commit's cadence: commits start at least ``flush_interval_ms`` apart,
and a fix that arrives after a quiet spell is committed at once instead of waiting
the interval out for company."""

from __future__ import annotations

import asyncio

import numpy as np

from tests.server_fixtures import now_ms
from tracking_grpc.core.fixes import FixBatch

INTERVAL_S = 8.0


def fixes(device: str, seq: int) -> FixBatch:
    lat = np.array([47.0])
    t = [now_ms() - 60_000 + seq]
    return FixBatch.from_columns("t", [device], [seq], t, lat, lat)


async def test_a_fix_after_a_quiet_spell_is_committed_at_once(start_server) -> None:
    server = await start_server(flush_interval_ms=INTERVAL_S * 1000)
    pipeline = server.app.pipeline
    async with asyncio.timeout(INTERVAL_S / 2):  # not the interval's wait
        first = await pipeline.ingest(fixes("a", 1))
    assert first.stored == 1
    # The next commit may not start before the interval has passed: its fix
    # waits for it.
    second = asyncio.ensure_future(pipeline.ingest(fixes("a", 2)))
    await asyncio.sleep(0.5)
    assert not second.done()
    async with asyncio.timeout(INTERVAL_S * 4):
        assert (await second).stored == 1
    assert await server.app.history.count("t") == 2
