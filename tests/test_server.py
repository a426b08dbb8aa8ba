"""Server plumbing: health, reflection, events on the device stream, shutdown."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tracking.v1 import event_pb2, track_pb2_grpc

from tests.server_fixtures import batch, fix, hello, track_session
from tracking_grpc.errors import StorageUnavailable
from tracking_grpc.events import EventType, TrackingEvent, event_id


async def test_health_reports_serving(channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tracking.v1.TrackSession"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    names = {s.name for s in reply.list_services_response.service}
    assert {"tracking.v1.TrackSession", "grpc.health.v1.Health"} <= names
    await call.done_writing()


class EchoProcessor:
    """A processor that raises one ENTER per stored fix (test double of geofencing)."""

    name = "echo"

    async def process(self, stored):
        return [
            TrackingEvent(
                event_id=event_id(stored.tenant, d, EventType.ENTER, t, "f"),
                tenant=stored.tenant,
                device=d,
                type=EventType.ENTER,
                time_ms=t,
                lat=0.0,
                lon=0.0,
                fix_seq=s,
                created_ms=t,
                fence_id="f",
            )
            for d, t, s in zip(
                stored.device.tolist(),
                stored.time_ms.tolist(),
                stored.seq.tolist(),
                strict=True,
            )
        ]


async def test_events_reach_the_stream_that_asked(server, stub) -> None:
    server.app.pipeline.add_processor(EchoProcessor())
    call = stub.Track()
    await call.write(hello("d", want_events=True))
    await call.read()
    await call.write(batch([fix(1, 1.0, 1.0)]))
    kinds = {(await call.read()).WhichOneof("message") for _ in range(2)}
    assert kinds == {"ack", "event"}
    await call.done_writing()


class FlakyStoreProcessor(EchoProcessor):
    """Finds its store unavailable ``outages`` times, then raises its events."""

    name = "flaky"

    def __init__(self, outages: int) -> None:
        self.outages = outages
        self.done = asyncio.Event()

    async def process(self, stored):
        if self.outages:
            self.outages -= 1
            raise StorageUnavailable("fence store away (test)")
        self.done.set()
        return await super().process(stored)


async def test_a_processor_waiting_for_its_store_says_so_once(
    server, stub, caplog
) -> None:
    processor = FlakyStoreProcessor(outages=4)
    server.app.pipeline.add_processor(processor)
    call = stub.Track()
    await call.write(hello("d", want_events=True))
    await call.read()
    await call.write(batch([fix(1, 1.0, 1.0)]))
    kinds = {(await call.read()).WhichOneof("message") for _ in range(2)}
    assert kinds == {"ack", "event"}  # the events came after the outage
    await asyncio.wait_for(processor.done.wait(), 10)
    await call.done_writing()
    said = [
        r.getMessage()
        for r in caplog.records
        if r.name == "tracking_grpc.ingest" and r.levelno >= logging.WARNING
    ]
    assert said == [
        "processor flaky waits for its store: fence store away (test)",
        "processor flaky has its store back",
    ]


async def test_acked_fixes_survive_a_restart(start_server, tmp_path) -> None:
    server = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        _, acks = await track_session(
            stub, "d", [[fix(i, 1.0, 1.0 + i / 1e4)] for i in range(1, 21)]
        )
    assert acks[-1].last_stored_seq == 20
    await server.stop(1)
    again = await start_server()
    assert await again.app.history.count("default", "d") == 20
    live = await again.app.live.get("default", ["d"])
    assert live.seq.tolist() == [20]


async def test_stop_drains_open_stream(start_server) -> None:
    server = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = track_pb2_grpc.TrackSessionStub(channel).Track()
        await call.write(hello("d"))
        await call.read()
        await call.write(batch([fix(1, 1.0, 1.0)]))
        ack = (await call.read()).ack
        stopping = asyncio.create_task(server.stop(0.5))
        code = await call.code()
        await stopping
    assert ack.acked_seq == 1
    assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


def test_event_types_mirror_the_contract() -> None:
    in_proto = {
        name.removeprefix("EVENT_TYPE_"): value
        for name, value in event_pb2.EventType.items()
        if value
    }
    assert in_proto == {t.name: t.value for t in EventType}


class GatedLiveStore:
    """The server's live store, its updates held until ``gate`` opens (a Redis
    paused or failing over)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = asyncio.Event()

    async def update(self, batch):
        await self.gate.wait()
        return await self.inner.update(batch)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


async def test_acks_go_on_while_the_live_store_is_stuck(server, stub) -> None:
    """Acks wait for storage only: a live update that hangs holds up the live
    position, not the next commits (it used to keep its commit's slot, so every
    later ack waited for it)."""
    live = GatedLiveStore(server.app.pipeline.live)
    server.app.pipeline.live = live
    batches = [[fix(i, 1.0, 1.0 + i / 1e4)] for i in range(1, 6)]
    try:  # a hang guard only: before, the second ack never came
        _, acks = await asyncio.wait_for(track_session(stub, "d", batches), 30)
    finally:
        live.gate.set()
    assert [a.acked_seq for a in acks] == [1, 2, 3, 4, 5]
    assert await server.app.history.count("default", "d") == 5
    for _ in range(100):  # the held updates go through once the gate opens
        positions = await live.inner.get("default", ["d"])
        if positions.seq.tolist() == [5]:
            break
        await asyncio.sleep(0.05)
    assert positions.seq.tolist() == [5]
