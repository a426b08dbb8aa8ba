"""A real Prometheus (Debian's ``prometheus``) on loopback, scraping given targets.

Used by the observability tests: it starts with a temporary config and data
directory on a free 127.0.0.1 port, scrapes every second, and answers instant
queries. Tests skip (or fail under TRACKING_REQUIRE_SERVICES) when it is missing.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.conftest import require_service

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrometheusServer:
    """One Prometheus process; use as a context manager."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            require_service("prometheus", "apt-get install prometheus")
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: tracking\n"
            f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
        )
        self.command = [
            str(binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.log_path = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusServer:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url("/-/ready"), timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def query(self, promql: str) -> float | None:
        """The single value of an instant query, or None when it has no result."""
        params = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(
            self.url(f"/api/v1/query?{params}"), timeout=5
        ) as r:
            result = json.load(r)["data"]["result"]
        if not result:
            return None
        return float(result[0]["value"][1])

    def wait_for(self, promql: str, expected: float, timeout_s: float = 20.0) -> float:
        """Poll until the query returns ``expected``; returns the last value seen."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.query(promql)
            if value == expected:
                return value
            time.sleep(0.25)
        return value if value is not None else float("nan")
