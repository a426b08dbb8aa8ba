"""A group commit that fails for a reason other than an unavailable store (the
store refuses one tenant's data): that tenant's callers get the error instead of
waiting forever, and the other tenants' fixes in the same flush are stored.

The refusal is injected by wrapping the server's real SQLite history store: no
input that reaches the store can make it refuse data since tenants are checked at
the door (a NUL in a tenant made PostgreSQL refuse, and hung every caller of that
flush)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.server_fixtures import now_ms
from tracking_grpc.core.fixes import FixBatch


class RefusingStore:
    """The real store, but a commit of tenant ``refused`` raises ValueError."""

    def __init__(self, inner, refused: str) -> None:
        self.inner, self.refused = inner, refused

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def store(self, batch: FixBatch) -> np.ndarray:
        if batch.tenant == self.refused:
            raise ValueError("the store refused this tenant's data")
        return await self.inner.store(batch)


def fixes(tenant: str, devices: int) -> FixBatch:
    t0 = now_ms() - 60_000
    names = [f"{tenant}-{i}" for i in range(devices)]
    lat = np.full(devices, 47.0)
    return FixBatch.from_columns(tenant, names, [1] * devices, [t0] * devices, lat, lat)


async def test_a_refused_commit_fails_its_callers_and_spares_other_tenants(
    start_server,
) -> None:
    server = await start_server()
    pipeline = server.app.pipeline
    pipeline.history = RefusingStore(pipeline.history, "bad")
    async with asyncio.timeout(30):  # hang guard: before, "bad" waited forever
        refused, accepted = await asyncio.gather(
            pipeline.ingest(fixes("bad", 3)),
            pipeline.ingest(fixes("good", 5)),
            return_exceptions=True,
        )
        again = await pipeline.ingest(fixes("later", 2))
    assert isinstance(refused, ValueError)
    assert accepted.stored == 5 and again.stored == 2
    assert await server.app.history.count("good") == 5
    with pytest.raises(ValueError):
        await pipeline.ingest(fixes("bad", 1))
