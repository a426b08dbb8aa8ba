"""A simulated gateway: columnar PublishBatch calls for many devices, open loop.

Batch ``k`` is sent at ``start + k / rate`` whatever happened to earlier ones; at most
``gateway_max_inflight`` calls are outstanding, and a batch due while that many are
waiting is counted as ``gateway_overload`` instead of being sent late. Each batch
carries the next ``gateway_batch_fixes`` devices of the gateway, one fix each. A call
the server refuses while its storage is behind (RESOURCE_EXHAUSTED with a retry
delay: nothing stored) is sent again after the delay, still counted in flight; its
latency runs from the first send. The calls made after it wait until it is
answered, counted in flight too (``client.order``): a device's fixes are not stored
after newer ones for a refusal.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import numpy as np
from tracking.v1 import common_pb2, track_pb2, track_pb2_grpc

from tracking_grpc.client.order import CallOrder, OrderedCall
from tracking_grpc.client.status import refusal_delay_s
from tracking_grpc.loadgen.channels import sleep_until
from tracking_grpc.loadgen.plan import DriverResult, Plan

# A call refused this long is given up (an error), as a gateway's buffer would be.
REFUSED_FOR_S = 120.0


class Gateway:
    """Devices behind one gateway and their sequence numbers."""

    def __init__(self, name: str, plan: Plan, result: DriverResult, seed: int) -> None:
        n = plan.gateway_devices
        if plan.gateway_batch_fixes > n:
            raise ValueError("a gateway batch may carry each device at most once")
        self.plan = plan
        self.result = result
        rng = np.random.default_rng(seed)
        self.device_ids = np.array([f"{name}-{i:06d}" for i in range(n)], dtype=object)
        self.seq = np.zeros(n, dtype=np.uint64)
        self.lat = plan.center[0] + rng.uniform(-plan.spread_deg, plan.spread_deg, n)
        self.lon = plan.center[1] + rng.uniform(-plan.spread_deg, plan.spread_deg, n)
        self.cursor = 0
        self.last_ms = 0
        self.inflight: set[asyncio.Task[None]] = set()
        self.order = CallOrder()

    def _request(self, sched_s: float) -> tuple[track_pb2.PublishBatchRequest, int]:
        size = self.plan.gateway_batch_fixes
        rows = (self.cursor + np.arange(size)) % len(self.device_ids)
        self.cursor = int(rows[-1]) + 1
        self.seq[rows] += 1
        time_ms = max(int(sched_s * 1000), self.last_ms + 1)
        self.last_ms = time_ms
        columns = track_pb2.ColumnarFixes(
            device_ids=self.device_ids[rows].tolist(),
            device_index=range(size),
            seq=self.seq[rows].tolist(),
            time_ms=[time_ms] * size,
            lat=self.lat[rows].tolist(),
            lon=self.lon[rows].tolist(),
            provider=[common_pb2.PROVIDER_GNSS] * size,
        )
        return track_pb2.PublishBatchRequest(columns=columns), time_ms

    async def run(
        self,
        stub: track_pb2_grpc.TrackSessionStub,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> None:
        window = self.plan.window
        period_s = 1.0 / self.plan.gateway_rate_per_s
        k = 0
        while (sched_s := window.start_s + k * period_s) < window.end_s:
            k += 1
            await sleep_until(sched_s)
            if len(self.inflight) >= self.plan.gateway_max_inflight:
                self.result.error("gateway_overload")
                continue
            request, time_ms = self._request(sched_s)
            task = asyncio.create_task(self.publish(stub, request, time_ms, metadata))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
        if self.inflight:
            await asyncio.wait(self.inflight, timeout=30.0)

    async def _send(
        self,
        stub: track_pb2_grpc.TrackSessionStub,
        request: track_pb2.PublishBatchRequest,
        metadata: tuple[tuple[str, str], ...] | None,
        call: OrderedCall,
    ) -> track_pb2.PublishBatchResponse | None:
        """The call's answer, sent when its turn comes and again while the server
        refuses it for congestion (RESOURCE_EXHAUSTED with a retry delay: nothing
        was stored), after that delay and a jitter of up to as much, holding back
        the calls made after it; None after another error, or refusals for longer
        than ``REFUSED_FOR_S`` (counted from when the call was made)."""
        result = self.result
        refused_since = time.monotonic()
        with call:
            await call.turn()
            while True:
                try:
                    return await stub.PublishBatch(
                        request, metadata=metadata, timeout=30
                    )
                except grpc.aio.AioRpcError as exc:
                    hint_s = refusal_delay_s(exc)
                    given_up = time.monotonic() - refused_since > REFUSED_FOR_S
                    if hint_s is None or given_up:
                        code = exc.code().name
                        result.error(f"publish_{code}", detail=exc.details() or "")
                        return None
                    result.count("gateway_calls_refused")
                    call.refused()
                    await asyncio.sleep(hint_s * (1 + random.random()))
                    await call.turn()

    async def publish(
        self,
        stub: track_pb2_grpc.TrackSessionStub,
        request: track_pb2.PublishBatchRequest,
        time_ms: int,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> None:
        """Send one batch (in turn, see ``client.order``) and count its outcome."""
        call = self.order.call()
        size = len(request.columns.seq)
        result = self.result
        result.count("fixes_generated", size)
        sent_ns = time.time_ns()
        response = await self._send(stub, request, metadata, call)
        if response is None:
            return
        now_ns = time.time_ns()
        if self.plan.window.counts(time_ms):
            result.batch_ms.append((now_ns - sent_ns) / 1e6)
            result.count("window_fixes_stored", response.stored)
        result.count("batches_acked")
        result.count("fixes_stored", response.stored)
        result.count("fixes_duplicate", response.duplicates)
        if response.duplicates:  # never resent: the devices are of another run
            result.error(
                "gateway_fixes_duplicate",
                response.duplicates,
                detail="the server holds these devices' sequence numbers: a run "
                "tag of an earlier run? (bench/load.py --run-tag)",
            )
        if response.rejected:  # all of them; at most 1,000 are listed
            result.error("rejected_fixes", response.rejected)
