"""Private Redis, Redis Cluster and PostgreSQL instances that a test starts and stops.

Fault tests kill and restart these; nothing here touches the shared services. All
bind 127.0.0.1 on free ports and live in the test's temporary directory.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CLUSTER_OPTIONS = ("--cluster-replicas", "0", "--cluster-yes")


def _pg_bin() -> Path:
    """The newest installed PostgreSQL's binaries (Debian layout), or the override."""
    if "TRACKING_TEST_PG_BIN" in os.environ:
        return Path(os.environ["TRACKING_TEST_PG_BIN"])
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: (
            int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0
        ),
    )
    return versions[-1].parent if versions else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


def free_port(low: int = 20000, high: int = 30000) -> int:
    """A loopback port that is free, and whose +10000 (cluster bus) is free too."""
    for _ in range(200):
        port = random.randint(low, high)
        if all(_is_free(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free loopback port found")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up within {timeout_s}s")


class RedisServer:
    """One redis-server on 127.0.0.1, optionally a cluster node; restartable."""

    def __init__(self, workdir: Path, port: int | None = None, cluster: bool = False):
        if shutil.which("redis-server") is None:
            raise FileNotFoundError("redis-server is not installed")
        self.port = port or free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
            args += ["--cluster-config-file", str(self.dir / "nodes.conf")]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(self.ping, 10.0, f"redis on port {self.port}")

    def ping(self) -> bool:
        return self.command("PING") == "PONG"

    def command(self, *words: str) -> str:
        """Run one command through redis-cli; its answer as text."""
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *words], capture_output=True, text=True
        )
        return done.stdout.strip()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


def create_cluster(nodes: list[RedisServer]) -> None:
    """Join started cluster-mode servers into a cluster of masters, slots assigned."""
    addresses = [f"127.0.0.1:{n.port}" for n in nodes]
    subprocess.run(
        ["redis-cli", "--cluster", "create", *addresses, *CLUSTER_OPTIONS],
        check=True,
        capture_output=True,
        timeout=60,
    )

    def ready() -> bool:
        info = subprocess.run(
            ["redis-cli", "-p", str(nodes[0].port), "cluster", "info"],
            capture_output=True,
            text=True,
        ).stdout
        return "cluster_state:ok" in info

    wait_for(ready, 20.0, "redis cluster")


class PostgresServer:
    """A private PostgreSQL cluster (initdb + pg_ctl) on 127.0.0.1, as user postgres.

    The server refuses to run as root, so as root the data directory is handed to
    the postgres user and the commands run through ``runuser``.
    """

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise FileNotFoundError(f"initdb not found in {PG_BIN}")
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are private to root.
        self.dir = Path(tempfile.mkdtemp(prefix=f"trk-pg-{self.port}-"))
        self.data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust"])

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
        options += " -c fsync=off -c full_page_writes=off"
        log_file = str(self.dir / "log")
        self._run(
            [
                "pg_ctl",
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                log_file,
                "-w",
                "start",
            ]
        )

    def stop(self, mode: str = "immediate") -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"])

    def destroy(self) -> None:
        """Stop the server if it runs and delete its files."""
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, command: list[str]) -> None:
        command = [str(PG_BIN / command[0]), *command[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)


class ServerProcess:
    """``tracking serve`` in a process of its own on a fixed loopback port."""

    def __init__(self, env: dict[str, str], workers: int = 1, port: int | None = None):
        self.port = port or free_port()
        self.env = {**os.environ, **env, "TRACKING_LISTEN": f"127.0.0.1:{self.port}"}
        self.env["TRACKING_WORKERS"] = str(workers)
        self.env.setdefault("TRACKING_LOG_FORMAT", "text")
        self.process: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="trk-server-", suffix=".log")[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        import sys

        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tracking_grpc", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self.serving, timeout_s, f"server on port {self.port}")

    def serving(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"server exited:\n{self.log()}")
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye, as a crash or a lost machine."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log_path.unlink(missing_ok=True)
