"""Private backends for one load run, removed afterwards.

- ``Production``: a migrated PostgreSQL database (on the shared server, or on a
  private one) and a Redis key prefix (on the shared Redis, or on a private Redis
  Cluster).
- ``PrivateRedisCluster``: N cluster-mode redis-server masters on free 127.0.0.1
  ports in a temporary directory, every slot assigned.
- ``PrivatePostgres``: initdb + pg_ctl on a free 127.0.0.1 port, durable settings
  (fsync on) like the shared server.

The servers are started the way the test suite starts its own (``tests.services``),
so the load tool and the cluster tests exercise the same set-up. A private server's
processes are known by pid, so their CPU time is this run's alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.services import (
    PostgresServer,
    RedisServer,
    create_cluster,
    wait_for,
)
from tracking_grpc.loadgen import procstat

SLOTS = 16384
STORED_PER_DEVICE = "SELECT device, count(*), max(seq) FROM fixes GROUP BY device"


def _cli(port: int, *words: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *words],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


class PrivateRedisCluster:
    """A Redis Cluster of ``shards`` masters (no replicas) on loopback."""

    def __init__(self, shards: int) -> None:
        if shards < 1:
            raise ValueError("a cluster needs at least one shard")
        self.dir = Path(tempfile.mkdtemp(prefix="tracking-load-redis-"))
        self.nodes = [RedisServer(self.dir, cluster=True) for _ in range(shards)]
        try:
            for node in self.nodes:
                node.start()
            if shards >= 3:
                create_cluster(self.nodes)  # redis-cli refuses fewer than 3 masters
            else:
                self._assign_slots()
            self.wait_ready()
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        """Until every node says the cluster is whole (after a start or restart)."""
        for node in self.nodes:
            wait_for(lambda n=node: self._ok(n.port), 20.0, "redis cluster")

    def _assign_slots(self) -> None:
        """What ``redis-cli --cluster create`` does, for one or two masters."""
        edges = [SLOTS * i // len(self.nodes) for i in range(len(self.nodes) + 1)]
        for node, low, high in zip(self.nodes, edges, edges[1:], strict=False):
            _cli(node.port, "cluster", "addslotsrange", str(low), str(high - 1))
        for node in self.nodes[1:]:
            _cli(self.nodes[0].port, "cluster", "meet", "127.0.0.1", str(node.port))

    def _ok(self, port: int) -> bool:
        info = _cli(port, "cluster", "info")
        known = f"cluster_known_nodes:{len(self.nodes)}"
        return "cluster_state:ok" in info and known in info

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def pids(self) -> list[int]:
        return [n.process.pid for n in self.nodes if n.process is not None]

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres(PostgresServer):
    """A PostgreSQL server of this run alone, with the shared server's durability;
    ``settings`` (``name=value``) are given to the server as ``-c`` options."""

    def __init__(self, settings: Sequence[str] = ()) -> None:
        super().__init__()
        self.settings = list(settings)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
        options += "".join(f" -c {setting}" for setting in self.settings)
        log_file = str(self.dir / "log")
        command = ["pg_ctl", "-D", str(self.data), "-o", options, "-l", log_file]
        self._run([*command, "-w", "start"])

    @property
    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def pids(self) -> list[int]:
        """The postmaster and its backends, now (backends come and go)."""
        return [self.pid, *procstat.children(self.pid)]


class Production:
    """A private, migrated PostgreSQL database and Redis key prefix for one run.

    ``redis_shards`` 0 uses the Redis at ``redis_url`` (shared: its CPU is an upper
    bound); N starts a private Redis Cluster of N masters. ``private_postgres``
    starts a PostgreSQL server of this run's own instead of using ``admin_url``,
    with ``postgres_settings`` (``name=value``) on its command line.
    """

    def __init__(
        self,
        admin_url: str,
        redis_url: str,
        redis_shards: int = 0,
        private_postgres: bool = False,
        postgres_settings: Sequence[str] = (),
    ) -> None:
        import asyncio

        from tracking_grpc.storage import schema

        self.cluster: PrivateRedisCluster | None = None
        self.postgres: PrivatePostgres | None = None
        self.name = f"trkload_{os.getpid()}_{int(time.time())}"
        self.prefix = f"trkload{os.getpid()}:"
        self.redis_url = redis_url
        self.admin_url = admin_url
        try:
            if redis_shards:
                self.cluster = PrivateRedisCluster(redis_shards)
                self.redis_url = self.cluster.url
            if private_postgres:
                self.postgres = PrivatePostgres(postgres_settings)
                self.postgres.start()
                self.admin_url = self.postgres.admin_url
            self.url = f"{self.admin_url.rsplit('/', 1)[0]}/{self.name}"
            self._admin(f'CREATE DATABASE "{self.name}"')
            asyncio.run(schema.migrate(self.url))
        except BaseException:
            self.close()
            raise

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(statement)

    @property
    def flags(self) -> list[str]:
        return [
            f"--database-url={self.url}",
            f"--redis-url={self.redis_url}",
            f"--redis-key-prefix={self.prefix}",
        ]

    def stored(self) -> list[tuple[str, int, int]]:
        import psycopg

        with psycopg.connect(self.url) as conn:
            return conn.execute(STORED_PER_DEVICE).fetchall()

    def close(self) -> None:
        if self.postgres is not None:
            self.postgres.destroy()
        elif hasattr(self, "url"):
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        if self.cluster is not None:
            self.cluster.close()
        else:
            self._drop_prefix()

    def _drop_prefix(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()


class BackendMeter:
    """CPU seconds of PostgreSQL and Redis since the meter was made.

    A private server is measured by its own processes (exact); a shared one by every
    process of that name (an upper bound: other users' work counts too).
    """

    NAMES = ("postgres", "redis-server")

    def __init__(self, production: Production | None) -> None:
        self.production = production
        # Per process, so that backends started inside the window (a connection
        # pool growing under load) count too.
        self.shared = {
            n: procstat.cpu_by_pid(procstat.pids_named(n)) for n in self.NAMES
        }
        cluster = production.cluster if production else None
        postgres = production.postgres if production else None
        self.exact = {"postgres": postgres is not None, "redis-server": bool(cluster)}
        self.start, self.start_shards = self._now()

    def _now(self) -> tuple[dict[str, float], dict[int, float]]:
        cpu = {
            n: sum(
                max(0.0, used - self.shared[n].get(pid, 0.0))
                for pid, used in procstat.cpu_by_pid(procstat.pids_named(n)).items()
            )
            for n in self.NAMES
        }
        shards: dict[int, float] = {}  # pid -> CPU seconds, in shard order
        if self.production is not None:
            if self.production.postgres is not None:
                cpu["postgres"] = procstat.usage(self.production.postgres.pid).cpu_s
            if self.production.cluster is not None:
                for pid in self.production.cluster.pids:
                    shards[pid] = sum(procstat.cpu_by_pid([pid]).values())
        return cpu, shards

    def elapsed(self) -> tuple[dict[str, float], list[float]]:
        """CPU seconds per backend, and per Redis shard (private cluster only). A
        shard restarted meanwhile counts from its restart."""
        cpu, shards = self._now()
        per = {n: max(0.0, cpu[n] - self.start[n]) for n in self.NAMES}
        by_shard = [used - self.start_shards.get(p, 0.0) for p, used in shards.items()]
        if shards:
            per["redis-server"] = sum(by_shard)
        return per, by_shard
