"""A bare grpc.aio peer of the tracking server: the load tool's yardstick.

``bench/load.py --peer`` runs its workload against this server as well, in the same
run, so that its latencies and CPU can be read as ratios to what gRPC, the event
loop and the machine cost on their own. The peer speaks the same contract with the
same server options and uvloop, but does no work of the service: ``Track`` answers
the hello with ``SessionStarted`` and every batch with an ``Ack`` at once (nothing
is stored), and ``Watch`` (whole tenant or named devices, no snapshot) gets each
fix as a position, coalesced per write. Health answers SERVING.

    .venv/bin/python bench/echo_peer.py --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "generated")]

from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc  # noqa: E402

from tracking_grpc.config import Settings  # noqa: E402
from tracking_grpc.server import server_options  # noqa: E402

log = logging.getLogger(__name__)


class _Watch:
    """One Watch stream's positions not yet written, newest per device."""

    def __init__(self, device_ids: set[str]) -> None:
        self.device_ids = device_ids
        self.pending: dict[str, common_pb2.Position] = {}
        self.ready = asyncio.Event()


class EchoTrack(track_pb2_grpc.TrackSessionServicer):
    """Acks every batch at once; hands every fix to the open watches."""

    def __init__(self) -> None:
        self.watches: set[_Watch] = set()

    async def Track(
        self,
        request_iterator: AsyncIterator[track_pb2.TrackRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        device_id = first.hello.device_id
        started = track_pb2.SessionStarted(
            device_id=device_id, server_time_ms=time.time_ns() // 1_000_000
        )
        await context.write(track_pb2.TrackResponse(started=started))
        newest = 0
        async for request in request_iterator:
            fixes = request.batch.fixes
            acked = 0
            for fix in fixes:
                acked = max(acked, fix.seq)
            newest = max(newest, acked)
            if self.watches and len(fixes):
                self._publish(device_id, fixes)
            ack = track_pb2.Ack(
                acked_seq=acked, last_stored_seq=newest, stored=len(fixes)
            )
            await context.write(track_pb2.TrackResponse(ack=ack))

    def _publish(self, device_id: str, fixes: Sequence[common_pb2.Fix]) -> None:
        received_ms = time.time_ns() // 1_000_000
        fix = fixes[-1]
        position = common_pb2.Position(
            device_id=device_id,
            seq=fix.seq,
            time_ms=fix.time_ms,
            lat=fix.lat,
            lon=fix.lon,
            received_ms=received_ms,
        )
        for watch in self.watches:
            if not watch.device_ids or device_id in watch.device_ids:
                watch.pending[device_id] = position
                watch.ready.set()

    async def Watch(
        self, request: track_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> None:
        watch = _Watch(set(request.device_ids))
        self.watches.add(watch)
        try:
            await context.send_initial_metadata(())
            while True:
                await watch.ready.wait()
                watch.ready.clear()
                positions, watch.pending = list(watch.pending.values()), {}
                await context.write(track_pb2.WatchResponse(positions=positions))
        finally:
            self.watches.discard(watch)


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=server_options(Settings()))
    track_pb2_grpc.add_TrackSessionServicer_to_server(EchoTrack(), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"echo peer: cannot listen on {listen}")
    await server.start()
    log.info("echo peer listening on %s", listen)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="loopback HOST:PORT")
    args = parser.parse_args()
    if not args.listen.startswith(("127.0.0.1:", "localhost:")):
        parser.error("--listen must be a loopback address")
    logging.basicConfig(level=logging.WARNING)
    uvloop.run(serve(args.listen))


if __name__ == "__main__":
    main()
