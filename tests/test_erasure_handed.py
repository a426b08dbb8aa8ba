"""The commits an erasure waits for count as handed to the processors only with
every earlier one: a flush that leaves early (cancelled, or failing before its
turn) while the one before it is still writing moves nothing on until that one
is through. No real fault makes a flush leave early at will, so the pipeline of a
real, idle server is told of its commits' ends directly, out of order."""

from __future__ import annotations

import asyncio

from tracking_grpc.server import TrackingServer


async def test_a_commit_through_before_the_one_before_it_hands_nothing_on(
    start_server,
) -> None:
    server: TrackingServer = await start_server()
    pipeline = server.app.pipeline
    assert pipeline.idle
    base = pipeline._commits  # every commit so far is through
    waiting = asyncio.ensure_future(pipeline._handed_through(base + 2))
    await asyncio.sleep(0)

    pipeline._note_handed(base + 2)  # left early; base + 1 still writing
    await asyncio.sleep(0)
    assert not waiting.done()
    assert pipeline._handed == base

    pipeline._note_handed(base + 1)
    await asyncio.wait_for(waiting, 5)
    assert pipeline._handed == base + 2
