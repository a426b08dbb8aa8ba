"""Gateway calls while storage is behind, and device streams after it caught up,
against a real server on port 0 whose history store is away until a test ends the
outage.

A gateway call that arrives while ``max_pending_fixes`` are pending waits holding
its request only, up to ``max_waiting_batch_fixes`` fixes of such calls; one beyond
is refused with RESOURCE_EXHAUSTED and a retry delay, nothing of it stored, and the
documented client sends it again. Once the store is back, device streams' small
batches go into the first commits, ahead of the gateway backlog, and a device's
fixes are stored in the order they were submitted.

The gateway clients (the replay client's and the load tool's) send a refused call
again after its delay and hold back the calls made after it meanwhile, so that its
fixes are not stored after newer ones of the same devices; while none is refused,
their calls are pipelined.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import grpc
import pytest
from tracking.v1 import track_pb2, track_pb2_grpc

from tests.server_fixtures import batch, fix, hello, now_ms
from tracking_grpc import convert
from tracking_grpc.client.gateway import _publish_with_retry
from tracking_grpc.client.order import CallOrder
from tracking_grpc.client.session import RetryPolicy, SessionStats
from tracking_grpc.client.status import retry_delay_s
from tracking_grpc.commit_queue import CommitQueue, Submission
from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.errors import StorageUnavailable
from tracking_grpc.ingest import IngestPipeline
from tracking_grpc.loadgen.gateway import Gateway
from tracking_grpc.loadgen.plan import DriverResult, Plan, Window
from tracking_grpc.observability import tracing

HANG_GUARD_S = 30.0


class Outage:
    """The history store's ``store``, away until ``end``; the devices of each
    commit it stored, in commit order."""

    def __init__(self, store: Callable) -> None:
        self.store = store
        self.down = True
        self.tries = 0
        self.commits: list[list[tuple[str, int]]] = []

    async def __call__(self, fixes):
        self.tries += 1
        if self.down:
            raise StorageUnavailable("store away (test)")
        pairs = zip(fixes.device.tolist(), fixes.seq.tolist(), strict=True)
        self.commits.append(list(pairs))
        return await self.store(fixes)

    def end(self) -> None:
        self.down = False

    def commit_of(self, device: str) -> int:
        """The first commit that stored fixes of ``device``."""
        return next(
            n
            for n, fixes in enumerate(self.commits)
            if any(d == device for d, _ in fixes)
        )

    def stored_seqs(self, device: str) -> list[int]:
        """The sequence numbers of ``device`` in the order they were stored."""
        return [seq for fixes in self.commits for d, seq in fixes if d == device]


@pytest.fixture
def outage(monkeypatch) -> Callable:
    def begin(server) -> Outage:
        history = server.app.history
        away = Outage(history.store)
        monkeypatch.setattr(history, "store", away)
        return away

    return begin


async def until(check: Callable[[], bool]) -> None:
    """Wait until ``check()`` holds, looking every 10 ms."""
    async with asyncio.timeout(HANG_GUARD_S):
        while not check():  # noqa: ASYNC110 - polls the state of other tasks
            await asyncio.sleep(0.01)


def gateway_request(*devices: str, seq: int = 1) -> track_pb2.PublishBatchRequest:
    t = now_ms()
    columns = track_pb2.ColumnarFixes(
        device_ids=list(devices),
        device_index=range(len(devices)),
        seq=[seq] * len(devices),
        time_ms=[t - 1_000 + seq] * len(devices),
        lat=[45.0] * len(devices),
        lon=[7.0] * len(devices),
    )
    return track_pb2.PublishBatchRequest(columns=columns)


async def congest(stub, pipeline: IngestPipeline) -> asyncio.Future:
    """A 3-fix call that fills ``max_pending_fixes`` (3) while storage is away;
    its answer, once storage is back."""
    queued = asyncio.ensure_future(stub.PublishBatch(gateway_request("a", "b", "c")))
    await until(lambda: pipeline.admission.congested)
    return queued


async def test_a_congested_server_holds_a_bounded_gateway_backlog(
    start_server, outage, monkeypatch
) -> None:
    server = await start_server(max_pending_fixes=3, max_waiting_batch_fixes=4)
    away = outage(server)
    converted = []
    columns_to_batch = convert.columns_to_batch
    monkeypatch.setattr(
        convert,
        "columns_to_batch",
        lambda *args: converted.append(1) or columns_to_batch(*args),
    )
    pipeline = server.app.pipeline
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        queued = await congest(stub, pipeline)
        waiting = asyncio.ensure_future(
            stub.PublishBatch(gateway_request("d", "e", "f", "g"))
        )
        await until(lambda: pipeline.admission.waiting_batch_fixes == 4)
        assert len(converted) == 1  # the waiting call holds its request only

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.PublishBatch(gateway_request("h"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "nothing of this call (1 fixes) was stored" in refused.value.details()
        assert retry_delay_s(refused.value) == 1.0

        stats = SessionStats(device="gateway")
        policy = RetryPolicy(initial_s=0.01, max_s=0.05)
        retried = asyncio.create_task(
            _publish_with_retry(
                stub, gateway_request("h"), (), policy, stats, CallOrder().call()
            )
        )
        await until(lambda: stats.reconnects >= 1)  # refused, waiting to retry
        away.end()
        async with asyncio.timeout(HANG_GUARD_S):
            answers = [await queued, await waiting, await retried]

    assert [a.stored for a in answers] == [3, 4, 1]
    assert not stats.error
    assert await server.app.history.count("default", "h") == 1


async def test_a_call_larger_than_the_bound_waits_when_no_other_does(
    start_server, outage
) -> None:
    """Refused whenever storage is behind, a call over the bound would never get in
    while it stays behind: the first call to wait waits whatever its size."""
    server = await start_server(max_pending_fixes=3, max_waiting_batch_fixes=4)
    away = outage(server)
    pipeline = server.app.pipeline
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        queued = await congest(stub, pipeline)
        large = asyncio.ensure_future(stub.PublishBatch(gateway_request(*"defghi")))
        await until(lambda: pipeline.admission.waiting_batch_fixes == 6)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.PublishBatch(gateway_request("j"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        away.end()
        async with asyncio.timeout(HANG_GUARD_S):
            answers = [await queued, await large]
    assert [a.stored for a in answers] == [3, 6]


async def test_device_streams_go_ahead_of_a_gateway_backlog_in_device_order(
    start_server, outage
) -> None:
    """The first commit after the outage (the one that was retrying) carries the
    first call; the next takes the waiting device batches before the two gateway
    calls queued ahead of them, except the batch of a device those calls hold
    fixes of: it stays behind them."""
    server = await start_server(flush_max_fixes=4)
    away = outage(server)
    pipeline = server.app.pipeline
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        calls = []
        for n, devices in enumerate(
            [("g1", "g2", "g3", "g4"), ("g5", "g6", "g7", "g8"), ("g9", "g10", "g11")]
        ):
            devices += ("shared",) if n == 2 else ()
            request = gateway_request(*devices, seq=n + 1)
            calls.append(asyncio.ensure_future(stub.PublishBatch(request)))
            # The first call is in the retrying commit, the others wait.
            await until(lambda q=4 * n: away.tries > 0 and pipeline.waiting_fixes == q)
        streams = []
        for n, device in enumerate(("phone", "shared")):
            stream = stub.Track()
            await stream.write(hello(device))
            await stream.read()
            await stream.write(batch([fix(5, 45.0, 7.0)]))
            streams.append(stream)
            await until(lambda q=9 + n: pipeline.waiting_fixes == q)
        away.end()
        async with asyncio.timeout(HANG_GUARD_S):
            await asyncio.gather(*calls)
            acks = [(await stream.read()).ack for stream in streams]
        for stream in streams:
            await stream.done_writing()

    assert [ack.stored for ack in acks] == [1, 1]
    assert away.commit_of("phone") <= away.commit_of("g5") < away.commit_of("g9")
    assert away.stored_seqs("shared") == [3, 5]


def queued(queue: CommitQueue, tenant: str = "t"):
    """Queue a device row submission (``"a"``) or a batch (``["a", "b"]``)."""

    def put(what: str | list[str]) -> Submission:
        done = asyncio.get_running_loop().create_future()
        pending = Submission(tenant, 1, 0, done, tracing.INVALID_CONTEXT)
        if isinstance(what, str):
            pending = replace(pending, device=what, rows=[])
        else:
            n = len(what)
            batch = FixBatch.from_columns(
                tenant, what, range(1, n + 1), [0] * n, [1.0] * n, [1.0] * n
            )
            pending = replace(pending, size=n, batch=batch)
        queue.append(pending)
        return pending

    return put


def names(items: list[Submission]) -> list[str]:
    return [i.device or "+".join(i.batch.device.tolist()) for i in items]


async def test_a_long_queue_takes_rows_first_but_never_past_their_own_device() -> None:
    queue = CommitQueue()
    put = queued(queue)
    for what in (["a", "b"], "c", "a", ["d"], "e"):
        put(what)
    assert names(queue.take(2)) == ["c", "e"]  # "a" waits behind a+b
    assert names(queue.take(2)) == ["a+b"]  # passed over once: first now
    assert names(queue.take(2)) == ["a", "d"]  # the rest fits: in order
    assert queue.fixes == 0 and not queue


async def test_a_queue_of_batches_alone_is_taken_in_order_unread() -> None:
    """Without device rows waiting, batches go in arrival order and nobody works
    out their devices."""
    queue = CommitQueue()
    put = queued(queue)
    batches = [put(["a", "b"]), put(["c", "d"]), put(["e", "f"])]
    assert names(queue.take(3)) == ["a+b", "c+d"]
    assert all(b._devices is None for b in batches)


class ReplayGateway:
    """The replay client's calls (``tracking replay --via publish``), in one order."""

    def __init__(self, stub) -> None:
        self.stub, self.order = stub, CallOrder()
        self.stats = SessionStats(device="gateway")

    def send(self, request: track_pb2.PublishBatchRequest) -> Awaitable:
        policy = RetryPolicy(initial_s=0.01, max_s=0.05)
        call = self.order.call()
        return _publish_with_retry(self.stub, request, (), policy, self.stats, call)

    def refusals(self) -> int:
        return self.stats.reconnects


class LoadGateway:
    """The load tool's gateway (bench/load.py --gateways)."""

    def __init__(self, stub) -> None:
        self.stub, self.result = stub, DriverResult(0)
        plan = Plan(
            "", Window(time.time(), 0, 600), gateway_devices=2, gateway_batch_fixes=2
        )
        self.gateway = Gateway("gw", plan, self.result, seed=1)

    def send(self, request: track_pb2.PublishBatchRequest) -> Awaitable:
        time_ms = int(request.columns.time_ms[0])
        return self.gateway.publish(self.stub, request, time_ms, None)

    def refusals(self) -> int:
        return self.result.counts.get("gateway_calls_refused", 0)


GATEWAYS = [
    pytest.param(ReplayGateway, id="replay-client"),
    pytest.param(LoadGateway, id="load-tool"),
]


@pytest.mark.parametrize("client", GATEWAYS)
async def test_a_refused_call_is_stored_before_the_later_calls_of_its_devices(
    start_server, outage, client
) -> None:
    """The refused call goes again after its delay; the calls made meanwhile wait
    behind it, though storage caught up and would take them at once."""
    server = await start_server(max_pending_fixes=3, max_waiting_batch_fixes=0)
    away = outage(server)
    pipeline = server.app.pipeline
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = track_pb2_grpc.TrackSessionStub(channel)
        gateway = client(stub)
        queued = await congest(stub, pipeline)
        refused = asyncio.ensure_future(gateway.send(gateway_request("x", "y")))
        await until(lambda: gateway.refusals() >= 1)
        away.end()
        await until(lambda: not pipeline.admission.congested)
        later = [
            asyncio.ensure_future(gateway.send(gateway_request("x", "y", seq=n)))
            for n in (2, 3)
        ]
        async with asyncio.timeout(HANG_GUARD_S):
            await queued
            await asyncio.gather(refused, *later)

    assert away.stored_seqs("x") == away.stored_seqs("y") == [1, 2, 3]
    for device in "xy":
        assert await server.app.history.count("default", device) == 3


@pytest.mark.parametrize("client", GATEWAYS)
async def test_calls_are_pipelined_while_none_is_refused(
    start_server, outage, client
) -> None:
    """Three calls reach the server while none of them is answered. (gRPC does not
    order calls in flight at once: the first calls of a new connection have been
    seen taken in another order than they were made.)"""
    server = await start_server()
    away = outage(server)
    pipeline = server.app.pipeline
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        gateway = client(track_pb2_grpc.TrackSessionStub(channel))
        calls = [
            asyncio.ensure_future(gateway.send(gateway_request("x", "y", seq=n)))
            for n in (1, 2, 3)
        ]
        await until(lambda: pipeline.admission.pending == 6)
        away.end()
        async with asyncio.timeout(HANG_GUARD_S):
            await asyncio.gather(*calls)
    assert sorted(away.stored_seqs("x")) == [1, 2, 3]
    assert gateway.refusals() == 0
