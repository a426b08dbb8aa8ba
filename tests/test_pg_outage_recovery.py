"""After a PostgreSQL outage of some tens of seconds, writes resume within seconds of
its return, not after the connection pool's next backed-off reconnect attempt.

psycopg_pool retries a lost connection after 1, 2, 4, 8, 16, 32 ... s (doubling
without a cap until ``reconnect_timeout``, 5 min): every slot of a pool whose server
went away is in that schedule, so a server back after ~35 s waited for the attempt
at ~63 s, about half a minute of held acks after PostgreSQL was already serving.
"""

from __future__ import annotations

import asyncio
import time

from tests.test_backend_faults import fixes, private_postgres  # noqa: F401
from tracking_grpc.errors import StorageUnavailable
from tracking_grpc.storage.postgres import PostgresHistoryStore

OUTAGE_S = 35.0


async def test_writes_resume_soon_after_a_long_outage(
    private_postgres,  # noqa: F811
) -> None:
    history = await PostgresHistoryStore.open(
        private_postgres.url("tracking"), max_connections=4
    )
    assert (await history.store(fixes("t", 1, 10))).all()
    private_postgres.stop("fast")
    down_until = time.monotonic() + OUTAGE_S
    backoff = 0.05
    while time.monotonic() < down_until:  # what the ingest pipeline does meanwhile
        try:
            await history.store(fixes("t", 11, 10))
            raise AssertionError("stored while PostgreSQL was down")
        except StorageUnavailable:
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
    private_postgres.start()
    back = time.monotonic()
    while True:
        try:
            mask = await history.store(fixes("t", 11, 10))
            break
        except StorageUnavailable:
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
    waited = time.monotonic() - back
    await history.close()
    assert mask.all()
    # Before: 22-26 s (the next backed-off attempt); now about 2 s. The bound leaves
    # room for a busy machine.
    assert waited < 12.0, f"writes resumed {waited:.1f} s after PostgreSQL was back"
