"""Faults at set moments of a load run, for failover trials.

- ``--kill-worker-at-s S``: S seconds into the steady state, SIGKILL one worker of
  ``serve --workers N``: the one serving the watchers (they share one channel, so
  one connection), or, without watchers, the one holding the most client
  connections. The kernel gives new connections to the workers left; the
  supervisor does not replace the dead one.
- ``--restart-redis-at-s S`` (a private Redis, ``--redis-shards N``): SIGKILL the
  first shard, leave it down ``--redis-down-s`` seconds, start it again on the same
  port with the same cluster configuration and no data (the run's Redis keeps
  nothing on disk), as a Redis without persistence comes back from a crash.
- ``--stop-postgres-at-s S`` (``--private-postgres``): stop the run's PostgreSQL
  server (fast shutdown: its connections end), leave it down ``--postgres-down-s``
  seconds and start it again; the server's resident memory is read before the
  stop, at the restart and every second after it until the steady state ends
  (what a backlog held, and whether it was given back once it drained).

Each fault runs in a thread of its own and records what it did; the run's JSON
lists the records under ``faults``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from load_backends import PrivatePostgres, PrivateRedisCluster

from tracking_grpc.loadgen import procstat, sockets

log = logging.getLogger(__name__)

Record = dict[str, object]


@dataclass(frozen=True, slots=True)
class Target:
    """What the faults act on: the spawned server, the run's private Redis and
    PostgreSQL."""

    server_pid: int
    port: int
    cluster: PrivateRedisCluster | None = None
    postgres: PrivatePostgres | None = None


def _worker_to_kill(
    workers: list[int], port: int, watcher_pid: int | None
) -> tuple[int, str]:
    """The worker serving the watchers, else the one with the most connections."""
    if watcher_pid is not None:
        pid = sockets.serving(workers, port, watcher_pid)
        if pid is not None:
            return pid, "served the watchers"
    held = sockets.held_by_each(workers, port)
    return workers[held.index(max(held))], "held the most connections"


def kill_worker(target: Target, watcher_pid: int | None) -> Record:
    """SIGKILL one worker of the server (see the module docstring for which)."""
    workers = procstat.workers(target.server_pid)
    if len(workers) < 2:
        raise RuntimeError(f"the server has {len(workers)} workers; 2 are needed")
    pid, chosen = _worker_to_kill(workers, target.port, watcher_pid)
    held = sockets.held_by_each([pid], target.port)[0]
    os.kill(pid, signal.SIGKILL)
    log.warning("killed worker %d (it %s, %d connections)", pid, chosen, held)
    return {
        "pid": pid,
        "chosen": chosen,
        "connections_held": held,
        "workers": workers,
    }


def restart_redis(cluster: PrivateRedisCluster, down_s: float) -> Record:
    """Kill the first shard, wait ``down_s``, start it again; waits for the cluster."""
    node = cluster.nodes[0]
    node.stop()
    time.sleep(down_s)
    started_s = time.time()
    node.start()
    cluster.wait_ready()
    log.warning("restarted the Redis shard on port %d", node.port)
    return {
        "port": node.port,
        "down_s": down_s,
        "ready_after_start_s": round(time.time() - started_s, 3),
    }


def stop_postgres(
    postgres: PrivatePostgres, server_pid: int, down_s: float, watch_s: float
) -> Record:
    """Stop PostgreSQL for ``down_s``, start it again, then read the server's
    resident memory every second for ``watch_s``."""

    def rss_mb() -> float:
        return round(procstat.usage(server_pid).rss_bytes / 2**20, 1)

    before_mb = rss_mb()
    postgres.stop("fast")
    log.warning("stopped PostgreSQL on port %d", postgres.port)
    time.sleep(down_s)
    at_restart_mb = rss_mb()
    postgres.start()
    log.warning("started PostgreSQL again on port %d", postgres.port)
    after_mb = []
    for _ in range(int(watch_s)):
        time.sleep(1.0)
        after_mb.append(rss_mb())
    return {
        "down_s": down_s,
        "rss_before_mb": before_mb,
        "rss_at_restart_mb": at_restart_mb,
        "rss_each_s_after_mb": after_mb,
    }


class Faults:
    """The faults a run asked for, each fired at its moment of the steady state."""

    def __init__(self) -> None:
        self._planned: list[tuple[str, float, Callable[[], Record]]] = []
        self._threads: list[threading.Thread] = []
        self.records: list[Record] = []

    def __bool__(self) -> bool:
        return bool(self._planned)

    def add(self, kind: str, at_s: float, action: Callable[[], Record]) -> None:
        self._planned.append((kind, at_s, action))

    def start(self, steady_start_s: float) -> None:
        for kind, at_s, action in self._planned:
            thread = threading.Thread(
                target=self._fire,
                args=(kind, steady_start_s + at_s, steady_start_s, action),
                name="load-fault",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def _fire(
        self,
        kind: str,
        when_s: float,
        steady_start_s: float,
        action: Callable[[], Record],
    ) -> None:
        time.sleep(max(0.0, when_s - time.time()))
        fired_s = time.time()
        record: Record = {"kind": kind}
        try:
            record.update(action())
        except Exception as exc:
            log.exception("the fault %s failed", kind)
            record["error"] = repr(exc)
        record["at_s"] = round(fired_s - steady_start_s, 3)
        self.records.append(record)

    def join(self, timeout_s: float = 60.0) -> list[Record]:
        """Wait for every fault to be done; their records, by time."""
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        return sorted(self.records, key=lambda r: float(str(r["at_s"])))


def plan_faults(
    args: argparse.Namespace, target: Target, watcher_pid: int | None
) -> Faults:
    """The faults the command line asks for (``--kill-worker-at-s``,
    ``--restart-redis-at-s``, ``--stop-postgres-at-s``)."""
    faults = Faults()
    if args.kill_worker_at_s is not None:
        faults.add(
            "kill_worker",
            args.kill_worker_at_s,
            lambda: kill_worker(target, watcher_pid),
        )
    if args.restart_redis_at_s is not None:
        cluster = target.cluster
        if cluster is None:
            raise ValueError("--restart-redis-at-s needs a private Redis")
        faults.add(
            "restart_redis",
            args.restart_redis_at_s,
            lambda: restart_redis(cluster, args.redis_down_s),
        )
    if args.stop_postgres_at_s is not None:
        postgres = target.postgres
        if postgres is None:
            raise ValueError("--stop-postgres-at-s needs --private-postgres")
        watch_s = args.steady_s - args.stop_postgres_at_s - args.postgres_down_s
        faults.add(
            "stop_postgres",
            args.stop_postgres_at_s,
            lambda: stop_postgres(
                postgres, target.server_pid, args.postgres_down_s, max(watch_s, 0)
            ),
        )
    return faults
