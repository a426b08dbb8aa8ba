"""One driver process: its devices, gateways and watchers, run on uvloop.

:func:`run` is the process entry point (it takes a :class:`Plan`, puts a
:class:`DriverResult` on a queue); :func:`drive` is the same in the current loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import resource
import time
from multiprocessing.queues import Queue

import uvloop

from tracking_grpc.loadgen.channels import ChannelPool, sleep_until
from tracking_grpc.loadgen.device import Device
from tracking_grpc.loadgen.gateway import Gateway
from tracking_grpc.loadgen.plan import DriverResult, Plan
from tracking_grpc.loadgen.watcher import Watcher

log = logging.getLogger(__name__)

END_GRACE_S = 30.0  # after the window: last acks, then everything is cancelled


def raise_open_file_limit(wanted: int = 65_536) -> int:
    """Lift the soft limit on open files towards ``wanted`` (streams need sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


def device_id(plan: Plan, i: int) -> str:
    """``load-RUN-DD-IIIIII`` (``load-DD-IIIIII`` without a run tag)."""
    run = f"{plan.run}-" if plan.run else ""
    return f"load-{run}{plan.index:02d}-{i:06d}"


def gateway_name(plan: Plan, g: int) -> str:
    """``gw-RUN-DD-GGG``, the prefix of its devices' ids (``gw-DD-GGG`` untagged)."""
    run = f"{plan.run}-" if plan.run else ""
    return f"gw-{run}{plan.index:02d}-{g:03d}"


async def _storm(
    plan: Plan,
    clients: list[Device | Watcher],
    pools: list[ChannelPool],
) -> None:
    """Cut every stream of this driver (devices' or watchers') at once; each
    reconnects at a random moment of the spread."""
    storm = plan.storm
    assert storm is not None
    await sleep_until(storm.drop_s)
    rng = random.Random(plan.index * 7919 + 1)
    for client in clients:
        client.reconnect_at_s = storm.drop_s + rng.uniform(0, storm.spread_s)
        client.dropped = True  # connected or opening: every call is cut
    await asyncio.gather(*(pool.close() for pool in pools))


async def _count_streams(devices: list[Device], result: DriverResult) -> None:
    while True:
        await asyncio.sleep(0.5)
        result.streams_open_max = max(
            result.streams_open_max, sum(d.connected for d in devices)
        )


async def drive(plan: Plan, watch_ids: list[str] | None = None) -> DriverResult:
    """Run the plan in the running loop; returns when the window and grace are over."""
    result = DriverResult(plan.index)
    rng = random.Random(plan.index)
    pool = ChannelPool(plan.target, plan.streams_per_channel, plan.tenant_token)
    window = plan.window
    devices = [
        Device(
            device_id(plan, i),
            i,
            plan,
            result,
            random.Random(rng.random()),
            window.start_s + window.ramp_s * i / max(1, plan.devices),
        )
        for i in range(plan.devices)
    ]
    gateway_pool = ChannelPool(plan.target, 1, plan.tenant_token)
    watch_pool = ChannelPool(plan.target, 100, plan.tenant_token)
    gateways = [
        Gateway(gateway_name(plan, g), plan, result, plan.index * 1000 + g)
        for g in range(plan.gateways)
    ]
    main = [asyncio.create_task(d.run(pool)) for d in devices]
    main += [
        asyncio.create_task(g.run(gateway_pool.stub(i), pool.metadata))
        for i, g in enumerate(gateways)
    ]
    background = [asyncio.create_task(_count_streams(devices, result))]
    watchers = [Watcher(i, plan, result, watch_ids or []) for i in range(plan.watchers)]
    background += [asyncio.create_task(w.run(watch_pool)) for w in watchers]
    if plan.storm is not None:
        clients: list[Device | Watcher] = [*devices, *watchers]
        storm = _storm(plan, clients, [pool, watch_pool])
        background.append(asyncio.create_task(storm))
    try:
        if main:
            timeout = window.end_s + END_GRACE_S - time.time()
            done, pending = await asyncio.wait(main, timeout=max(1.0, timeout))
            for task in pending:
                task.cancel()
                result.error("driver_timeout")
            for task in done:
                if task.exception() is not None:
                    log.error("driver task failed", exc_info=task.exception())
                    result.error(f"driver_{type(task.exception()).__name__}")
        else:
            await sleep_until(window.end_s + 1.0)
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await pool.close()
        await gateway_pool.close()
        await watch_pool.close()
    return result


def run(plan: Plan, watch_ids: list[str] | None, queue: Queue) -> None:
    """Process entry: drive the plan on uvloop and put the result on ``queue``."""
    raise_open_file_limit()
    if plan.nice > 0:
        os.nice(plan.nice)
    if plan.cpus:
        os.sched_setaffinity(0, plan.cpus)
    result = uvloop.run(drive(plan, watch_ids))
    queue.put(result)
