"""Device streams in a Node.js process (``bench/load.py --device-driver node``).

The Python driver spends about 330-370 µs of CPU per one-fix message, most of it in
grpc.aio's client writes and reads; ``bench/node_driver/`` does the same device work
with ``@grpc/grpc-js`` for about half that, which leaves the server more of a 2-core
machine. :class:`NodeDriver` starts it on a :class:`Plan` of devices only (JSON on
its standard input) and turns its JSON answer into a :class:`DriverResult`, so
everything downstream of the drivers is the same for both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

from tracking_grpc.loadgen.plan import DriverResult, Plan

NODE_DRIVER_DIR = Path(__file__).resolve().parents[2] / "bench" / "node_driver"
ENTRY = NODE_DRIVER_DIR / "driver.js"
INSTALLED = NODE_DRIVER_DIR / "node_modules" / "@grpc" / "grpc-js"


class NodeDriverError(RuntimeError):
    """The Node.js driver is not installed, or it failed."""


def check_installed() -> str:
    """The path of ``node``; raises when node or the npm packages are missing."""
    node = shutil.which("node")
    if node is None:
        raise NodeDriverError("node is not on PATH (the node device driver needs it)")
    if not INSTALLED.exists():
        raise NodeDriverError(
            f"{INSTALLED.parent.parent} is missing: run `make node-driver` "
            f"(npm ci in {NODE_DRIVER_DIR})"
        )
    return node


def result_from_json(data: dict) -> DriverResult:
    """A :class:`DriverResult` from the node driver's answer."""
    return DriverResult(
        index=int(data["index"]),
        ack_ms=data["ack_ms"],
        ack_sched_ms=data["ack_sched_ms"],
        send_lag_ms=data["send_lag_ms"],
        counts=data["counts"],
        errors=data["errors"],
        error_details=data["error_details"],
        started_s=float(data["started_s"]),
        streams_open_max=int(data["streams_open_max"]),
        generated=[(str(d), int(n), int(top)) for d, n, top in data["generated"]],
        reconnected_s=data["reconnected_s"],
        recovered_s=data["recovered_s"],
    )


class NodeDriver:
    """One ``node driver.js`` process running the device streams of ``plan``."""

    def __init__(self, plan: Plan) -> None:
        if plan.gateways or plan.watchers:
            raise ValueError("the node driver runs device streams only")
        node = check_installed()
        self.plan = plan
        self._dir = tempfile.TemporaryDirectory(prefix="tracking-node-driver-")
        self.result_path = Path(self._dir.name) / "result.json"
        command = [node, *plan.node_options, str(ENTRY), str(self.result_path)]
        if plan.nice > 0:  # as driver.py does for itself, for every thread of node
            command = ["nice", "-n", str(plan.nice), *command]
        cpus = plan.cpus
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            # Before node starts, so that its helper threads inherit the mask.
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(asdict(plan)).encode())
        self.process.stdin.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def result(self, timeout_s: float) -> DriverResult:
        """Wait for the process to end and read what it measured."""
        try:
            code = self.process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            message = f"node driver {self.plan.index} did not finish"
            raise NodeDriverError(message) from None
        try:
            if code != 0:
                raise NodeDriverError(
                    f"node driver {self.plan.index} exited with {code}"
                )
            return result_from_json(json.loads(self.result_path.read_text()))
        finally:
            self._dir.cleanup()

    def kill(self) -> None:
        """Stop the process if it still runs (an interrupted run)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._dir.cleanup()
