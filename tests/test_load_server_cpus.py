"""``bench/load.py --server-cpus``: the spawned server and every thread it starts
(gRPC's poller, worker threads) run only on the CPUs named, as ``taskset`` keeps a
deployed one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from load import EchoPeer, SpawnedServer


def masks(pid: int) -> set[frozenset[int]]:
    tasks = os.listdir(f"/proc/{pid}/task")
    return {frozenset(os.sched_getaffinity(int(t))) for t in tasks}


def test_the_server_and_its_threads_keep_to_the_cpus_named(tmp_path: Path) -> None:
    cpus = (min(os.sched_getaffinity(0)),)
    server = SpawnedServer(tmp_path, [], cpus)
    try:
        found = masks(server.pid)
    finally:
        assert server.stop() == 0
    assert found == {frozenset(cpus)}


def test_the_echo_peer_keeps_to_them_too(tmp_path: Path) -> None:
    cpus = (max(os.sched_getaffinity(0)),)
    peer = EchoPeer(tmp_path, cpus)
    try:
        found = masks(peer.pid)
    finally:
        peer.stop()
    assert found == {frozenset(cpus)}


def test_without_cpus_the_server_may_run_on_any(tmp_path: Path) -> None:
    server = SpawnedServer(tmp_path, [])
    try:
        found = masks(server.pid)
    finally:
        server.stop()
    assert found == {frozenset(os.sched_getaffinity(0))}
