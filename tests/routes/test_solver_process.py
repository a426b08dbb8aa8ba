"""OptimizeRoute after its solver process died (killed, out of memory)."""

from __future__ import annotations

import multiprocessing
import os
import signal

from tracking.v1 import route_pb2

from tests.routes.test_route_rpc import KAMPPI, SENATE, STATION

JOBS = [
    route_pb2.Job(id="a", location=SENATE, service_s=60),
    route_pb2.Job(id="b", location=KAMPPI, service_s=60),
]
VAN = route_pb2.Vehicle(id="van", start=STATION, end=STATION)
REQUEST = route_pb2.OptimizeRouteRequest(vehicles=[VAN], jobs=JOBS)


def kill_solvers() -> int:
    """SIGKILL the server's solver processes (the test's only spawned children)."""
    solvers = [
        p for p in multiprocessing.active_children() if p.name.startswith("Spawn")
    ]
    for process in solvers:
        os.kill(process.pid, signal.SIGKILL)
        process.join(30)
    return len(solvers)


async def test_a_dead_solver_process_is_replaced(routes) -> None:
    first = await routes.OptimizeRoute(REQUEST)
    assert kill_solvers() == 1

    again = await routes.OptimizeRoute(REQUEST)

    assert [s.job_id for s in again.routes[0].stops] == [
        s.job_id for s in first.routes[0].stops
    ]
    assert again.distance_m == first.distance_m
    assert kill_solvers() == 1  # a new one served it
